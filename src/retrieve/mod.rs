//! Stat, list and segment-level range reads.
//!
//! A read fetches the 96-byte header, checks the key commitment and that the
//! header names the object, customer key and kind the catalog expects, checks
//! the stored length against the plaintext size, and then fetches and
//! decrypts only the segments covering the requested range, in batches of
//! about [`READ_BATCH`] bytes. Nothing is returned before it is
//! authenticated; every integrity failure is the same opaque error.

pub mod redact;
pub mod sample;
pub mod silence;

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use crate::audit::{Actor, AuditLog, Event};
use crate::catalog::{Catalog, CustomerState, ListFilter, PageCursor, StoredObject};
use crate::crypto::format::{self, HEADER_LEN, SegmentOpener, TAG_LEN};
use crate::error::Error;
use crate::keys::KeyService;
use crate::model::{ObjectId, ObjectRecord, Purpose};
use crate::revocation::Revocations;
use crate::store::{Store, StoreError};

/// Ciphertext fetched per store request while streaming a range.
pub const READ_BATCH: u64 = 1 << 20;
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// An inclusive byte range, as in HTTP: `end: None` reads to the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub objects: Vec<ObjectRecord>,
    /// Pass back to continue; `None` on the last page.
    pub next_page_token: Option<String>,
}

pub struct Retrieve {
    catalog: Arc<dyn Catalog>,
    keys: Arc<KeyService>,
    store: Store,
    revocations: Arc<Revocations>,
    audit: AuditLog,
    /// Training use of customers with no recorded consent.
    default_training_use: bool,
    clock: Arc<dyn crate::clock::Clock>,
    /// Stores redacted renditions (derived items, under the source's
    /// customer key).
    ingest: Arc<crate::ingest::Ingest>,
}

/// Most objects a sample is drawn from; a larger population must be
/// narrowed by the filter.
const MAX_SAMPLE_POPULATION: usize = 100_000;
/// Most objects returned per interaction of a sample.
const MAX_GROUP: usize = 100;

/// How to draw a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleDraw {
    pub strata: sample::Strata,
    /// Interactions to draw (uniform draw).
    pub count: usize,
    /// Interactions per agent or queue (stratified draw).
    pub per_stratum: usize,
    pub seed: u64,
}

/// One drawn interaction with its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleGroup {
    pub key: String,
    pub stratum: String,
    pub objects: Vec<ObjectRecord>,
}

/// Largest transcript redacted in memory (transcripts are capped at 16 MiB
/// by default; this bounds memory if the cap is raised).
const MAX_REDACT_BYTES: u64 = 64 << 20;

/// The rendition's upload id: fixed per source and redaction version, so
/// every coach gets the one stored rendition (idempotent creation) and a
/// better redactor gets a new one.
pub fn rendition_upload_id(source: &ObjectId) -> crate::model::UploadId {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"recvault redacted rendition v1\n".as_slice(), source.as_bytes()].concat(),
    );
    let mut b: [u8; 16] = d.as_ref()[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x80; // a version nibble that no random v4 id has
    b[8] = (b[8] & 0x3f) | 0x80;
    crate::model::UploadId::from_bytes(b)
}

/// The object if its content may be read now: committed, not expired, its
/// customer active. Decided before any key is touched.
async fn readable(catalog: &dyn Catalog, id: &ObjectId) -> Result<StoredObject, Error> {
    check_readable(id, catalog.object(id).await?)
}

fn check_readable(id: &ObjectId, stored: Option<StoredObject>) -> Result<StoredObject, Error> {
    let stored = stored
        .ok_or_else(|| Error::NotFound(format!("object {id} not found (unknown id, or an upload not yet finished)")))?;
    if stored.customer_state != CustomerState::Active {
        return Err(Error::from_state(stored.customer_state));
    }
    if let Some(at) = stored.expired_at_ms {
        return Err(Error::NotFound(format!(
            "object {id} expired: its retention ended and it was crypto-erased at {}",
            crate::model::format_ms(at)
        )));
    }
    Ok(stored)
}

/// The parts the retrieval service works on.
pub struct RetrieveDeps {
    pub catalog: Arc<dyn Catalog>,
    pub keys: Arc<KeyService>,
    pub store: Store,
    pub revocations: Arc<Revocations>,
    pub audit: AuditLog,
    pub clock: Arc<dyn crate::clock::Clock>,
    pub ingest: Arc<crate::ingest::Ingest>,
}

impl Retrieve {
    /// `default_training_use`: whether customers with no recorded consent
    /// may be used for training (opt-out) or not (opt-in).
    pub fn new(deps: RetrieveDeps, default_training_use: bool) -> Self {
        let RetrieveDeps { catalog, keys, store, revocations, audit, clock, ingest } = deps;
        Self { catalog, keys, store, revocations, audit, default_training_use, clock, ingest }
    }

    /// Records a customer's consent to training use (audited first; no
    /// record, no change). Takes effect for the next read.
    pub async fn set_consent(
        &self,
        actor: &Actor,
        id: &crate::model::CustomerId,
        training_use: bool,
        updated_by: &str,
    ) -> Result<crate::model::Consent, Error> {
        crate::model::check_text("updated_by", updated_by, 128)?;
        let consent = crate::model::Consent {
            customer_id: id.clone(),
            training_use,
            updated_by: updated_by.trim().to_owned(),
            updated_at_ms: self.clock.now_ms(),
        };
        let event = Event::new("consent.set")
            .customer(id)
            .detail("training_use", if training_use { "allow" } else { "deny" })
            .detail("updated_by", &consent.updated_by);
        self.audit.append(actor, event.clone()).await?;
        if let Err(e) = self.catalog.set_consent(&consent).await {
            let _ = self.audit.append(actor, event.result(format!("failed: {e}"))).await;
            return Err(e.into());
        }
        tracing::info!(customer_id = %id, training_use, "consent recorded");
        Ok(consent)
    }

    /// A customer's consent as it applies now: the recorded one, or the
    /// configured default (`updated_at_ms` 0, `updated_by` "default").
    pub async fn consent(&self, id: &crate::model::CustomerId) -> Result<crate::model::Consent, Error> {
        Ok(self.catalog.consent(id).await?.unwrap_or_else(|| crate::model::Consent {
            customer_id: id.clone(),
            training_use: self.default_training_use,
            updated_by: "default".into(),
            updated_at_ms: 0,
        }))
    }

    /// Whether the customer's content may be used for training now (read
    /// per request, so an opt-out applies to the very next read).
    pub async fn training_use(&self, id: &crate::model::CustomerId) -> Result<bool, Error> {
        Ok(self.catalog.consent(id).await?.map_or(self.default_training_use, |c| c.training_use))
    }

    async fn readable(&self, id: &ObjectId) -> Result<StoredObject, Error> {
        readable(self.catalog.as_ref(), id).await
    }

    /// Records a request refused with `e` (best effort, after the fact),
    /// naming the customer of `object` when the catalog knows it
    /// (committed, expired or shredded alike). Shared by the gRPC
    /// handlers, the playback links and the refusals below.
    pub async fn refused(&self, actor: &Actor, event: Event, object: Option<&ObjectId>, e: &Error) {
        let owner = match object {
            Some(id) => self.catalog.object(id).await.ok().flatten().map(|s| s.record.spec.customer_id),
            None => None,
        };
        let event = match owner {
            Some(customer) => event.customer(&customer),
            None => event,
        };
        if let Err(failed) = self.audit.append(actor, event.result(e.audit_result())).await {
            tracing::warn!(error = %failed, "could not audit a refused request");
        }
    }

    /// Metadata of a committed object. With `training_only` (a coach), an
    /// opted-out customer's objects are refused like their content.
    pub async fn stat(&self, id: &ObjectId, training_only: bool) -> Result<ObjectRecord, Error> {
        let record = self.readable(id).await?.record;
        if training_only && !self.training_use(&record.spec.customer_id).await? {
            return Err(opted_out(&record.spec.customer_id, "coaching"));
        }
        Ok(record)
    }

    /// The object a read would serve, without reading it: for a caller
    /// without the unredacted grant (`redacted`), a chat transcript's
    /// redacted rendition (made now if it does not exist yet). Refused like
    /// the read would be: unknown, expired, customer not active, or, for a
    /// training purpose, opted out.
    pub async fn view(&self, id: &ObjectId, purpose: Purpose, redacted: bool) -> Result<ObjectRecord, Error> {
        let stored = self.readable(id).await?;
        if purpose.is_training() && !self.training_use(&stored.record.spec.customer_id).await? {
            return Err(opted_out(&stored.record.spec.customer_id, purpose.name()));
        }
        if redacted
            && stored.record.spec.kind == crate::model::ContentKind::ChatTranscript
            && stored.record.derived_from.is_none()
        {
            let rendition = self.redacted_rendition(&stored).await?;
            return Ok(self.readable(&rendition).await?.record);
        }
        Ok(stored.record)
    }

    /// Committed objects matching `filter`, newest first. With
    /// `training_only` (a coach), customers who opted out of training use
    /// are left out, so a page may hold fewer than `page_size` objects.
    pub async fn list(
        &self,
        filter: &ListFilter,
        page_token: &str,
        page_size: usize,
        training_only: bool,
    ) -> Result<Page, Error> {
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if let Some(id) = &filter.customer_id {
            match self.catalog.customer(id).await? {
                None => {
                    return Err(Error::NotFound(format!("customer {id} not found (nothing was ever stored for it)")));
                }
                Some(c) if c.state != CustomerState::Active => return Err(Error::from_state(c.state)),
                Some(_) => {}
            }
        }
        let mut filter = filter.clone();
        if training_only {
            filter.training_use = Some(self.default_training_use);
        }
        self.page(&filter, page_token, limit).await
    }

    async fn page(&self, filter: &ListFilter, page_token: &str, limit: usize) -> Result<Page, Error> {
        let after = if page_token.is_empty() { None } else { Some(decode_token(page_token)?) };
        let mut objects = self.catalog.list_objects(filter, after, limit + 1).await?;
        let next_page_token = if objects.len() > limit {
            objects.truncate(limit);
            objects.last().map(|o| encode_token(&cursor(o)))
        } else {
            None
        };
        Ok(Page { objects, next_page_token })
    }

    /// What a caller may search and sample: originals only (a rendition
    /// is reached through its source), and for a coach only customers who
    /// allow training use.
    fn scoped(&self, mut filter: ListFilter, training_only: bool) -> ListFilter {
        filter.originals_only = true;
        if training_only {
            filter.training_use = Some(self.default_training_use);
        }
        filter
    }

    /// Objects matching `filter`, newest first, one page, with the total.
    pub async fn search(
        &self,
        filter: ListFilter,
        page_token: &str,
        page_size: usize,
        training_only: bool,
    ) -> Result<(Page, u64), Error> {
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let filter = self.scoped(filter, training_only);
        let total = self.catalog.count_objects(&filter).await?;
        Ok((self.page(&filter, page_token, limit).await?, total))
    }

    /// Draws interactions matching `filter` ([`sample::draw`]) and returns
    /// each with its objects, and the number of interactions drawn from.
    pub async fn sample(
        &self,
        filter: ListFilter,
        draw: SampleDraw,
        training_only: bool,
    ) -> Result<(Vec<SampleGroup>, u64), Error> {
        let filter = self.scoped(filter, training_only);
        let mut candidates = Vec::new();
        let mut singles = std::collections::HashMap::new();
        let mut after = None;
        loop {
            let page = self.catalog.list_objects(&filter, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(cursor(last));
            for o in page {
                let i = &o.spec.interaction;
                let key = if i.interaction_id.is_empty() { o.object_id.to_string() } else { i.interaction_id.clone() };
                candidates.push(sample::Candidate {
                    key: key.clone(),
                    agent_id: i.agent_id.clone(),
                    queue: i.queue.clone(),
                });
                if i.interaction_id.is_empty() {
                    singles.insert(key, o);
                }
            }
            if candidates.len() > MAX_SAMPLE_POPULATION {
                return Err(Error::TooLarge(format!(
                    "more than {MAX_SAMPLE_POPULATION} objects match: narrow the filter (time range, queue, agent)"
                )));
            }
        }
        let population = candidates.iter().map(|c| c.key.as_str()).collect::<std::collections::HashSet<_>>().len();
        let drawn = sample::draw(&candidates, draw.strata, draw.count, draw.per_stratum, draw.seed);
        let mut groups = Vec::with_capacity(drawn.len());
        for (key, stratum) in drawn {
            let objects = match singles.remove(&key) {
                Some(o) => vec![o],
                None => {
                    let of_interaction = ListFilter {
                        interaction_id: Some(key.clone()),
                        originals_only: true,
                        training_use: filter.training_use,
                        ..Default::default()
                    };
                    self.catalog.list_objects(&of_interaction, None, MAX_GROUP).await?
                }
            };
            groups.push(SampleGroup { key, stratum, objects });
        }
        Ok((groups, population as u64))
    }

    /// Opens a range of an object for reading. Returns its metadata and a
    /// stream of `(offset, plaintext)` chunks covering exactly the range.
    /// The read is audited with its purpose before any key is touched, and
    /// refused if the record cannot be written.
    ///
    /// With `redacted` (a caller without the unredacted grant), a call
    /// recording's sensitive spans are silenced in every chunk (PCM and
    /// G.711 only; other formats with spans are refused), and a chat
    /// transcript is served as its redacted rendition: card numbers, IBANs,
    /// e-mail addresses, phone numbers and national ids masked
    /// ([`redact`]). The rendition is made once, stored as a derived item of
    /// the transcript (encrypted under the same customer key, so a shred or
    /// the transcript's expiry covers it) and read like any object; the
    /// returned record is the rendition's, with `derived_from` naming the
    /// transcript.
    pub async fn read(
        &self,
        actor: &Actor,
        purpose: Purpose,
        id: &ObjectId,
        range: ByteRange,
        redacted: bool,
    ) -> Result<(ObjectRecord, ReadStream), Error> {
        self.read_for(actor, purpose, id, range, redacted, ReadFor::default()).await
    }

    /// [`Retrieve::read`] for a request made with a playback link: its
    /// audit records, granted or refused, carry `via: link`.
    pub async fn read_link(
        &self,
        actor: &Actor,
        purpose: Purpose,
        id: &ObjectId,
        range: ByteRange,
        redacted: bool,
    ) -> Result<(ObjectRecord, ReadStream), Error> {
        self.read_for(actor, purpose, id, range, redacted, ReadFor { via: Some("link"), requested: None }).await
    }

    async fn read_for(
        &self,
        actor: &Actor,
        purpose: Purpose,
        id: &ObjectId,
        range: ByteRange,
        redacted: bool,
        context: ReadFor<'_>,
    ) -> Result<(ObjectRecord, ReadStream), Error> {
        let epoch = self.revocations.epoch();
        let mut event = Event::new("object.read").target(id).purpose(purpose.name());
        if let Some(via) = context.via {
            event = event.detail("via", via);
        }
        if let Some(requested) = context.requested {
            event = event.detail("requested", requested.to_string());
        }
        let found = self.catalog.object(id).await?;
        if let Some(f) = &found {
            event = event.customer(&f.record.spec.customer_id);
        }
        let checked = match check_readable(id, found) {
            Ok(stored) if purpose.is_training() && !self.training_use(&stored.record.spec.customer_id).await? => {
                Err(opted_out(&stored.record.spec.customer_id, purpose.name()))
            }
            other => other,
        };
        let stored = match checked {
            Ok(stored) => stored,
            Err(e) => {
                let _ = self.audit.append(actor, event.result(e.audit_result())).await;
                return Err(e);
            }
        };
        if redacted
            && stored.record.spec.kind == crate::model::ContentKind::ChatTranscript
            && stored.record.derived_from.is_none()
        {
            let rendition = match self.redacted_rendition(&stored).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.audit.append(actor, event.result(e.audit_result())).await;
                    return Err(e);
                }
            };
            let context = ReadFor { requested: Some(id), ..context };
            return Box::pin(self.read_for(actor, purpose, &rendition, range, false, context)).await;
        }
        let end_incl = match checked_range(&stored.record, range) {
            Ok(end) => end,
            Err(e) => {
                let _ = self.audit.append(actor, event.result(e.audit_result())).await;
                return Err(e);
            }
        };
        let spans: Vec<silence::Span> = match stored.record.spec.kind {
            crate::model::ContentKind::CallRecording if redacted => stored
                .record
                .spec
                .sensitive_spans
                .iter()
                .map(|s| silence::Span { start_ms: s.start_ms, end_ms: s.end_ms })
                .collect(),
            _ => Vec::new(),
        };
        let event = event.detail("range", [range.start, end_incl]);
        let event = if spans.is_empty() { event } else { event.detail("silenced_spans", spans.len()) };
        self.audit.append(actor, event.clone()).await?;
        crate::metrics::read(purpose);
        if spans.is_empty() {
            return self.open_range(stored, range.start, end_incl, epoch).await;
        }
        // Sensitive audio: silenced on the fly in every chunk, computed from
        // the recording's own header; a format that cannot be silenced in
        // place is refused rather than served unmasked.
        let layout = match self.audio_layout(&stored).await? {
            Ok(layout) => layout,
            Err(silence::Unsupported(why)) => {
                let e = Error::Precondition(why);
                let _ = self.audit.append(actor, event.result(e.audit_result())).await;
                return Err(e);
            }
        };
        let (record, stream) = self.open_range(stored, range.start, end_incl, epoch).await?;
        let masked = futures::StreamExt::map(stream, move |chunk| {
            chunk.map(|(offset, data)| {
                // The chunk is ours alone (freshly decrypted): no copy.
                let mut buf = data.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
                silence::silence_window(&layout, &spans, offset, &mut buf);
                (offset, buf.freeze())
            })
        });
        Ok((record, Box::pin(masked)))
    }

    /// How a recording's samples lie, from its first bytes (at most 64 KiB
    /// are decrypted for this).
    async fn audio_layout(
        &self,
        stored: &StoredObject,
    ) -> Result<Result<silence::AudioLayout, silence::Unsupported>, Error> {
        let head_len = stored.record.size.min(64 << 10);
        let mut head = Vec::with_capacity(head_len as usize);
        if head_len > 0 {
            let (_, mut chunks) =
                Box::pin(self.read_unaudited(stored, ByteRange { start: 0, end: Some(head_len - 1) })).await?;
            while let Some((_, chunk)) = futures::StreamExt::next(&mut chunks).await.transpose()? {
                head.extend_from_slice(&chunk);
            }
        }
        Ok(silence::layout(&stored.record.spec.content_type, &head))
    }

    /// Marks time spans of a call recording as sensitive (audited first;
    /// applies from the next read on).
    pub async fn mark_sensitive(
        &self,
        actor: &Actor,
        id: &ObjectId,
        spans: &[crate::model::TimeSpan],
    ) -> Result<ObjectRecord, Error> {
        let event = Event::new("object.mark_sensitive").target(id).detail("spans", spans.len());
        let checked = async {
            let stored = self.readable(id).await?;
            let kind = stored.record.spec.kind;
            if kind != crate::model::ContentKind::CallRecording {
                return Err(Error::Invalid(format!(
                    "object {id} is a {kind}: only call recordings have a time line to mark sensitive"
                )));
            }
            if spans.is_empty() {
                return Err(Error::Invalid("spans: give at least one span to mark sensitive".into()));
            }
            crate::model::TimeSpan::validate(spans)?;
            Ok(stored)
        };
        let stored = match checked.await {
            Ok(stored) => stored,
            Err(e) => {
                self.refused(actor, event, Some(id), &e).await;
                return Err(e);
            }
        };
        let event = event.customer(&stored.record.spec.customer_id);
        self.audit.append(actor, event.clone()).await?;
        let merged = match self.catalog.add_sensitive_spans(id, spans).await {
            Ok(m) => m,
            Err(e) => {
                let _ = self.audit.append(actor, event.result(format!("failed: {e}"))).await;
                return Err(match e {
                    crate::catalog::CatalogError::NotFound => Error::NotFound(format!("object {id} not found")),
                    other => other.into(),
                });
            }
        };
        tracing::info!(object_id = %id, spans = merged.len(), "sensitive spans marked");
        let mut record = stored.record;
        record.spec.sensitive_spans = merged;
        Ok(record)
    }

    /// A read by the service itself (the caller records it).
    async fn read_unaudited(
        &self,
        stored: &StoredObject,
        range: ByteRange,
    ) -> Result<(ObjectRecord, ReadStream), Error> {
        let epoch = self.revocations.epoch();
        let end_incl = checked_range(&stored.record, range)?;
        self.open_range(stored.clone(), range.start, end_incl, epoch).await
    }

    /// Unwraps the data key, checks the header against the catalog and
    /// returns the segment reader over `[start, end_incl]`.
    async fn open_range(
        &self,
        stored: StoredObject,
        start: u64,
        end_incl: u64,
        epoch: u64,
    ) -> Result<(ObjectRecord, ReadStream), Error> {
        let record = stored.record.clone();
        let id = &record.object_id;
        let size = record.size;
        let range = ByteRange { start, end: Some(end_incl) };
        let dek = self
            .keys
            .data_key(&stored.customer_ref, &record.spec.customer_id, id, stored.key_version, &stored.wrapped_dek)
            .await?;
        // A committed object that is gone or shorter than its header is
        // lost data like a failed tag: the same opaque DATA_LOSS, not an
        // internal error from reading past its end.
        let stored_len = match self.store.size(id).await {
            Ok(len) if len >= HEADER_LEN as u64 => len,
            Ok(_) | Err(StoreError::NotFound) => return Err(Error::Integrity),
            Err(e) => return Err(e.into()),
        };
        let header = self.store.read_range(id, 0..HEADER_LEN as u64).await?;
        let opener = SegmentOpener::new(&dek, &header)?;
        let f = opener.fields().clone();
        let matches = f.object_id == *id.as_bytes()
            && f.customer_ref == *stored.customer_ref.as_bytes()
            && f.key_version == stored.key_version
            && f.content_kind == record.spec.kind.code()
            && stored_len == format::ciphertext_len(size, f.segment_size);
        if !matches {
            return Err(Error::Integrity);
        }
        let seg = u64::from(f.segment_size);
        let reader = RangeReader {
            store: self.store.clone(),
            catalog: self.catalog.clone(),
            revocations: self.revocations.clone(),
            epoch,
            checked_at: tokio::time::Instant::now(),
            id: *id,
            opener,
            seg,
            segments: format::segment_count(size, f.segment_size),
            next_segment: range.start / seg,
            // For an empty object, segment 0 is still opened (and checked);
            // it yields nothing.
            last_segment: end_incl / seg,
            start: range.start,
            end: if size == 0 { 0 } else { end_incl + 1 },
            size,
        };
        let stream = futures::stream::try_unfold(reader, |mut r| async move {
            match r.next_batch().await? {
                None => Ok(None),
                Some(chunk) => Ok(Some((chunk, r))),
            }
        });
        Ok((record, Box::pin(stream)))
    }

    /// The id of the transcript's redacted rendition, made now if it does
    /// not exist yet. The service reads the transcript for this itself
    /// (recorded as `object.derive` by `system:redaction`); the caller
    /// never receives the unredacted bytes.
    async fn redacted_rendition(&self, source: &StoredObject) -> Result<ObjectId, Error> {
        let upload_id = rendition_upload_id(&source.record.object_id);
        if let Some(u) = self.catalog.upload(&upload_id).await?
            && u.committed
        {
            return self.checked_rendition(source, &u.object_id).await;
        }
        let record = &source.record;
        if record.size > MAX_REDACT_BYTES {
            return Err(Error::TooLarge(format!(
                "transcript {} has {} bytes, more than the {MAX_REDACT_BYTES} bytes redaction works on; \
                 only a reader with the unredacted grant can read it",
                record.object_id, record.size
            )));
        }
        let system = Actor::system("redaction");
        let event = Event::new("object.derive")
            .customer(&record.spec.customer_id)
            .target(record.object_id)
            .detail("rendition", "redacted-v1");
        self.audit.append(&system, event).await?;
        let (_, mut chunks) = Box::pin(self.read_unaudited(source, ByteRange { start: 0, end: None })).await?;
        let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(record.size as usize));
        while let Some((_, chunk)) = futures::StreamExt::next(&mut chunks).await.transpose()? {
            plain.extend_from_slice(&chunk);
        }
        let masked = redact_transcript(&record.spec.content_type, &plain)?;
        let derived = self
            .ingest
            .put_derived(
                &system,
                upload_id,
                &record.object_id,
                record.spec.kind,
                &record.spec.content_type,
                Bytes::from(masked),
            )
            .await?;
        tracing::info!(source = %record.object_id, rendition = %derived.object_id, "redacted rendition stored");
        Ok(derived.object_id)
    }

    /// The stored rendition, once it is shown to be what the server made
    /// from `source`: a transcript derived from it, of the same customer.
    /// It is served without redaction, so anything else found under its
    /// id (put there by a client, say) is refused, never served.
    async fn checked_rendition(&self, source: &StoredObject, id: &ObjectId) -> Result<ObjectId, Error> {
        let source = &source.record;
        let found = self.catalog.object(id).await?.map(|o| o.record);
        match found {
            Some(r)
                if r.derived_from == Some(source.object_id)
                    && r.spec.customer_id == source.spec.customer_id
                    && r.spec.kind == crate::model::ContentKind::ChatTranscript =>
            {
                Ok(r.object_id)
            }
            _ => {
                tracing::error!(source = %source.object_id, object_id = %id, "the redacted rendition's id names an object the server did not derive from this transcript; not served");
                Err(Error::Internal(format!(
                    "the redacted rendition of transcript {} is not the server's own; refusing to serve it",
                    source.object_id
                )))
            }
        }
    }
}

/// What a read's audit record says about how it was asked for.
#[derive(Debug, Clone, Copy, Default)]
struct ReadFor<'a> {
    /// `link` for a playback link's request.
    via: Option<&'static str>,
    /// The transcript asked for, when the read serves its rendition.
    requested: Option<&'a ObjectId>,
}

/// The inclusive end of `range` within the object, or why it is refused.
fn checked_range(record: &ObjectRecord, range: ByteRange) -> Result<u64, Error> {
    let (id, size) = (record.object_id, record.size);
    let end_incl = match range.end {
        Some(end) if end < range.start => {
            return Err(Error::Invalid(format!("range end {end} is before its start {}", range.start)));
        }
        Some(end) => end.min(size.saturating_sub(1)),
        None => size.saturating_sub(1),
    };
    if size > 0 && range.start >= size {
        return Err(Error::OutOfRange(format!(
            "range starts at byte {} but object {id} has {size} bytes",
            range.start
        )));
    }
    if size == 0 && range.start > 0 {
        return Err(Error::OutOfRange(format!("object {id} is empty")));
    }
    Ok(end_incl)
}

/// A transcript with its sensitive values masked: every string of a JSON
/// transcript, or the whole text.
fn redact_transcript(content_type: &str, plain: &[u8]) -> Result<Vec<u8>, Error> {
    let unreadable = || Error::Integrity;
    if content_type.starts_with("application/json") {
        let mut value: serde_json::Value = serde_json::from_slice(plain).map_err(|_| unreadable())?;
        redact::redact_json(&mut value);
        serde_json::to_vec(&value).map_err(Error::internal)
    } else {
        let text = std::str::from_utf8(plain).map_err(|_| unreadable())?;
        Ok(redact::redact(text).text.into_bytes())
    }
}

/// Longest a streaming read goes without re-checking its object's state.
const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Decrypted `(offset, plaintext)` chunks of a read.
pub type ReadStream = std::pin::Pin<Box<dyn Stream<Item = Result<(u64, Bytes), Error>> + Send + 'static>>;

struct RangeReader {
    store: Store,
    catalog: Arc<dyn Catalog>,
    revocations: Arc<Revocations>,
    /// The revocation epoch the object was last seen readable in.
    epoch: u64,
    /// When the object was last seen readable in the catalog.
    checked_at: tokio::time::Instant,
    id: ObjectId,
    opener: SegmentOpener,
    seg: u64,
    segments: u64,
    next_segment: u64,
    last_segment: u64,
    /// Plaintext range `[start, end)` to deliver.
    start: u64,
    end: u64,
    size: u64,
}

impl RangeReader {
    async fn next_batch(&mut self) -> Result<Option<(u64, Bytes)>, Error> {
        if self.next_segment > self.last_segment {
            return Ok(None);
        }
        let stride = self.seg + TAG_LEN as u64;
        let per_batch = (crate::retrieve::READ_BATCH / stride).max(1);
        let first = self.next_segment;
        let last = (first + per_batch - 1).min(self.last_segment);
        let from = format::segment_offset(first, self.seg as u32);
        let to = if last + 1 == self.segments {
            format::ciphertext_len(self.size, self.seg as u32)
        } else {
            format::segment_offset(last + 1, self.seg as u32)
        };
        let plain = match self.fetch_and_open(first, last, from..to).await {
            Ok(plain) => plain,
            Err(e) => {
                // A shred or expiry deletes the ciphertext under a running
                // read: report that, not a failed integrity check.
                self.still_readable().await?;
                return Err(e);
            }
        };
        self.next_segment = last + 1;
        self.still_readable().await?;
        let batch_start = first * self.seg;
        let lo = (self.start.max(batch_start) - batch_start) as usize;
        let hi = ((self.end.min(batch_start + plain.len() as u64)).saturating_sub(batch_start) as usize).max(lo);
        let offset = batch_start + lo as u64;
        let data = Bytes::from(plain).slice(lo..hi);
        if data.is_empty() {
            // Only an empty object gets here (its one empty segment was
            // authenticated above).
            return Ok(None);
        }
        Ok(Some((offset, data)))
    }
}

impl RangeReader {
    async fn fetch_and_open(&self, first: u64, last: u64, range: std::ops::Range<u64>) -> Result<Vec<u8>, Error> {
        let stride = self.seg + TAG_LEN as u64;
        let expected = range.end - range.start;
        let cipher = self.store.read_range(&self.id, range).await?;
        if cipher.len() as u64 != expected {
            return Err(Error::Integrity);
        }
        let mut plain = Vec::with_capacity(((last - first + 1) * self.seg) as usize);
        let mut buf = Vec::with_capacity(stride as usize);
        for (i, piece) in cipher.chunks(stride as usize).enumerate() {
            let index = first + i as u64;
            buf.clear();
            buf.extend_from_slice(piece);
            self.opener.open_segment(index, index + 1 == self.segments, &mut buf)?;
            plain.extend_from_slice(&buf);
        }
        Ok(plain)
    }

    /// A shred or expiry that landed while this read was streaming stops
    /// it before the next decrypted bytes leave (E2).
    async fn still_readable(&mut self) -> Result<(), Error> {
        let now = self.revocations.epoch();
        // The epoch moves at once for revocations made here or announced
        // by another replica; the periodic check bounds a read's lag if an
        // announcement is lost (docs/REPLICAS.md).
        if now != self.epoch || self.checked_at.elapsed() >= RECHECK_INTERVAL {
            self.checked_at = tokio::time::Instant::now();
            readable(self.catalog.as_ref(), &self.id).await?;
            self.epoch = now;
        }
        Ok(())
    }
}

fn cursor(o: &ObjectRecord) -> PageCursor {
    PageCursor { created_at_ms: o.created_at_ms, object_id: o.object_id }
}

fn opted_out(id: &crate::model::CustomerId, purpose: &str) -> Error {
    Error::PermissionDenied(format!(
        "customer {id} has opted out of training use: {purpose} reads are refused (legal and \
         data-subject-request reads are not affected)"
    ))
}

fn encode_token(c: &PageCursor) -> String {
    format!("v1.{}.{}", c.created_at_ms, c.object_id)
}

fn decode_token(token: &str) -> Result<PageCursor, Error> {
    let bad =
        || Error::Invalid("malformed page token: pass back the next_page_token of the previous page unchanged".into());
    let rest = token.strip_prefix("v1.").ok_or_else(bad)?;
    let (ms, id) = rest.split_once('.').ok_or_else(bad)?;
    Ok(PageCursor { created_at_ms: ms.parse().map_err(|_| bad())?, object_id: ObjectId::parse(id).map_err(|_| bad())? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let c = PageCursor { created_at_ms: 1_700_000_000_123, object_id: ObjectId::new_random() };
        assert_eq!(decode_token(&encode_token(&c)).unwrap(), c);
        for bad in ["", "v1", "v2.1.x", "v1.abc.00000000-0000-0000-0000-000000000001", "v1.1.not-a-uuid"] {
            assert!(matches!(decode_token(bad), Err(Error::Invalid(_))), "{bad}");
        }
    }
}
