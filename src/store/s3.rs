//! An S3-compatible bucket as the ciphertext store, through object_store's
//! own S3 client: settings, credentials that never print, bounded retries.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AwsCredential, S3ConditionalPut, S3CopyIfNotExists};
use object_store::{BackoffConfig, ClientOptions, RetryConfig, StaticCredentialProvider};
use zeroize::Zeroizing;

use super::{Store, StoreError, WriteOnce};

/// Where the bucket is and how to reach it. Built by the configuration
/// (`[storage]`, docs/S3.md).
#[derive(Debug)]
pub struct S3Settings {
    /// Base URL of an S3-compatible server ("http://127.0.0.1:3900");
    /// `None` is Amazon S3 itself, in `region`.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Permits an `http://` endpoint (loopback or a trusted network only:
    /// requests are signed, not encrypted — the payload is ciphertext, but
    /// the metadata and the access key id travel in the clear).
    pub allow_http: bool,
    pub credentials: S3Credentials,
    /// How commits keep objects write-once on this server.
    pub write_once: WriteOnce,
    /// Retries of one request after a transient failure (5xx, timeouts,
    /// dropped connections), with exponential backoff.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Longest time one HTTP request (a part of at most 16 MiB, say) may take.
    pub request_timeout: Duration,
    /// Each request's body hash is part of its signature (SigV4); otherwise
    /// `UNSIGNED-PAYLOAD` is signed in its place.
    pub sign_payload: bool,
}

/// An access key pair. No `Clone`; `Debug` prints neither half; the secret
/// is zeroized when dropped.
pub struct S3Credentials {
    access_key_id: Zeroizing<String>,
    secret_access_key: Zeroizing<String>,
}

impl S3Credentials {
    pub fn new(access_key_id: Zeroizing<String>, secret_access_key: Zeroizing<String>) -> Self {
        Self { access_key_id, secret_access_key }
    }
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("S3Credentials([redacted])")
    }
}

/// Connection set-up phase: nothing here has touched the network yet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// A bucket on an S3-compatible server. Nothing is sent until the first
    /// request; [`Store::check`] makes one.
    pub fn s3(settings: &S3Settings) -> Result<Self, StoreError> {
        // The client retries each request (every part too); retrying again
        // here would multiply the attempts. The deadline covers the
        // client's whole retry window.
        let retry = super::RetryPolicy::client_retries(settings.retry_timeout + settings.request_timeout);
        Ok(Self::with_write_once(s3_client(settings)?, settings.write_once).with_retry(retry))
    }
}

/// The bucket's object_store client, configured as the service uses it
/// (retries, timeouts, write-once mode). Also the load generator's peer: a
/// raw multipart PUT through it is what an upload into the bucket costs
/// without recvault.
pub fn s3_client(settings: &S3Settings) -> Result<Arc<dyn object_store::ObjectStore>, StoreError> {
    // reqwest is built with rustls but no bundled crypto provider, so the
    // process needs ring's as its default; an earlier install (ours or
    // anyone's) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // object_store keeps its own copy of the key pair for signing, as a
    // plain String (its Debug redacts the secret); ours stays zeroizing.
    let credential = AwsCredential {
        key_id: settings.credentials.access_key_id.as_str().to_owned(),
        secret_key: settings.credentials.secret_access_key.as_str().to_owned(),
        token: None,
    };
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: settings.max_retries,
        retry_timeout: settings.retry_timeout,
    };
    let client = ClientOptions::new()
        .with_allow_http(settings.allow_http)
        .with_timeout(settings.request_timeout)
        .with_connect_timeout(CONNECT_TIMEOUT);
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region)
        .with_virtual_hosted_style_request(!settings.path_style)
        .with_credentials(Arc::new(StaticCredentialProvider::new(credential)))
        .with_unsigned_payload(!settings.sign_payload)
        .with_retry(retry)
        .with_client_options(client);
    builder = match settings.write_once {
        // PUT with `If-None-Match: *`; a large object is moved from its
        // staging key by one UploadPartCopy completed with
        // `If-None-Match: *` (Amazon S3 since 2024, MinIO).
        WriteOnce::Conditional => builder
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_copy_if_not_exists(S3CopyIfNotExists::Multipart),
        // Plain PUTs after a HEAD; a request with a condition the server
        // ignores must not be sent as if it were honoured.
        WriteOnce::CheckFirst => builder.with_conditional_put(S3ConditionalPut::Disabled),
    };
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    Ok(Arc::new(builder.build()?))
}
