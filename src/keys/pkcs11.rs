//! Root key held in a PKCS#11 token (HSM): an AES-256 key that never leaves the token.
//!
//! Wrapped-key envelope (v1, do not change): 1 byte version `0x01`, 12 bytes
//! GCM IV, then the AES-256-GCM ciphertext of the 32-byte key followed by its
//! 16-byte tag; 61 bytes in all. The GCM AAD is the version byte followed by
//! the caller's AAD, so a later envelope version can never be read as this one.
//!
//! Sessions: one logged-in read-only session per provider, behind a mutex.
//! PKCS#11 login state is per application and token, not per session, so a
//! pool would buy only concurrency; the token calls here are short (one
//! 32-byte GCM operation), and serialising them keeps the session-state rules
//! of PKCS#11 (one operation at a time per session) trivially true. Every call
//! runs in `spawn_blocking`, since a network HSM can take milliseconds.
//! Because login is per process and token, a second provider opened on a token
//! this process is already logged in to is accepted without checking its PIN.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{KeyError, RootKey};
use crate::crypto::secret::{KEY_LEN, SecretKey, random_bytes};

/// Envelope version byte (do not change).
const ENVELOPE_V1: u8 = 1;
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
const TAG_LEN: usize = 16;
const ENVELOPE_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
/// Length of the random CKA_ID given to a key generated here.
const KEY_ID_LEN: usize = 8;

/// Where the root key lives in the token, and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the key.
    pub token_label: String,
    /// File holding the user PIN; refused if group or others can read it.
    pub pin_file: PathBuf,
    /// CKA_LABEL of the AES-256 secret key.
    pub key_label: String,
    /// Generate the key inside the token when no key has this label.
    pub create_key: bool,
}

/// A root key that is an AES-256 secret key object in a PKCS#11 token.
pub struct Pkcs11RootKey {
    inner: Arc<TokenKey>,
    key_id: String,
}

struct TokenKey {
    session: Mutex<Session>,
    key: ObjectHandle,
}

impl Pkcs11RootKey {
    /// Opens the token and finds (or generates) the key, off the runtime.
    pub async fn open(settings: Pkcs11Settings) -> Result<Self, KeyError> {
        tokio::task::spawn_blocking(move || Self::open_blocking(&settings))
            .await
            .map_err(|_| KeyError::Unavailable("pkcs11 open task failed".into()))?
    }

    /// [`Pkcs11RootKey::open`] for callers already off the async runtime.
    pub fn open_blocking(settings: &Pkcs11Settings) -> Result<Self, KeyError> {
        let (ctx, slot, session) = logged_in_session(settings, false)?;
        let key = match find_key(&session, settings)? {
            Some(key) => key,
            None if settings.create_key => {
                // Generating needs a read-write session; the key is created
                // by the token and only its handle comes back.
                let rw = ctx.open_rw_session(slot).map_err(|e| token_error(settings, "open a session", &e))?;
                generate_key(&rw, settings)?;
                drop(rw);
                find_key(&session, settings)?.ok_or_else(|| {
                    KeyError::Config(format!(
                        "pkcs11 key {:?} was generated but cannot be found in token {:?}",
                        settings.key_label, settings.token_label
                    ))
                })?
            }
            None => {
                return Err(KeyError::Config(format!(
                    "pkcs11 token {:?} has no AES key labelled {:?}; create it, or set root_key.create_key = true \
                     to generate it in the token",
                    settings.token_label, settings.key_label
                )));
            }
        };
        let attrs = session
            .get_attributes(key, &[AttributeType::Id, AttributeType::ValueLen, AttributeType::Extractable])
            .map_err(|e| token_error(settings, "read the key's attributes", &e))?;
        let mut object_id = Vec::new();
        for attr in attrs {
            match attr {
                Attribute::Id(id) => object_id = id,
                Attribute::ValueLen(len) if u64::from(len) != KEY_LEN as u64 => {
                    return Err(KeyError::Config(format!(
                        "pkcs11 key {:?} is {} bytes long, not an AES-256 key",
                        settings.key_label,
                        u64::from(len)
                    )));
                }
                Attribute::Extractable(true) => {
                    tracing::warn!(key_label = %settings.key_label, "pkcs11 root key is extractable from its token");
                }
                _ => {}
            }
        }
        let mut key_id = format!("pkcs11:{}/{}", settings.token_label, settings.key_label);
        if !object_id.is_empty() {
            key_id.push('#');
            key_id.push_str(&hex::encode(&object_id));
        }
        tracing::info!(%key_id, "pkcs11 root key opened");
        Ok(Self { inner: Arc::new(TokenKey { session: Mutex::new(session), key }), key_id })
    }

    /// Runs one token operation off the runtime, under the session lock.
    async fn with_session<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Session, ObjectHandle) -> Result<T, KeyError> + Send + 'static,
    ) -> Result<T, KeyError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let session =
                inner.session.lock().map_err(|_| KeyError::Unavailable("pkcs11 session lock poisoned".into()))?;
            op(&session, inner.key)
        })
        .await
        .map_err(|_| KeyError::Unavailable("pkcs11 task failed".into()))?
    }
}

#[async_trait]
impl RootKey for Pkcs11RootKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn wrap(&self, key: &SecretKey, aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut iv: [u8; IV_LEN] =
            random_bytes().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
        let plain = Zeroizing::new(key.expose().to_vec());
        let gcm_aad = envelope_aad(aad);
        self.with_session(move |session, handle| {
            let mut envelope = Vec::with_capacity(ENVELOPE_LEN);
            envelope.push(ENVELOPE_V1);
            envelope.extend_from_slice(&iv);
            let params = GcmParams::new(&mut iv, &gcm_aad, TAG_BITS.into())
                .map_err(|_| KeyError::Unavailable("pkcs11 gcm parameters".into()))?;
            let sealed = session.encrypt(&Mechanism::AesGcm(params), handle, &plain).map_err(|e| {
                tracing::error!(error = %e, "pkcs11 wrap failed");
                KeyError::Unavailable(format!("pkcs11 wrap failed: {e}"))
            })?;
            if sealed.len() != KEY_LEN + TAG_LEN {
                return Err(KeyError::Unavailable("pkcs11 wrap returned an unexpected length".into()));
            }
            envelope.extend_from_slice(&sealed);
            Ok(envelope)
        })
        .await
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretKey, KeyError> {
        if wrapped.len() != ENVELOPE_LEN || wrapped[0] != ENVELOPE_V1 {
            return Err(KeyError::DecryptionFailed);
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
        let sealed = wrapped[1 + IV_LEN..].to_vec();
        let gcm_aad = envelope_aad(aad);
        self.with_session(move |session, handle| {
            let params = GcmParams::new(&mut iv, &gcm_aad, TAG_BITS.into()).map_err(|_| KeyError::DecryptionFailed)?;
            let mut plain =
                Zeroizing::new(session.decrypt(&Mechanism::AesGcm(params), handle, &sealed).map_err(|e| {
                    if token_unreachable(&e) {
                        tracing::error!(error = %e, "pkcs11 unwrap failed");
                        KeyError::Unavailable(format!("pkcs11 unwrap failed: {e}"))
                    } else {
                        KeyError::DecryptionFailed
                    }
                })?);
            SecretKey::from_slice_zeroizing(&mut plain).map_err(|_| KeyError::DecryptionFailed)
        })
        .await
    }
}

/// Opens a session on the configured token and logs the user in.
fn logged_in_session(
    settings: &Pkcs11Settings,
    read_write: bool,
) -> Result<(Pkcs11, cryptoki::slot::Slot, Session), KeyError> {
    let pin = read_pin(&settings.pin_file)?;
    let ctx = context(&settings.module)?;
    let slot = find_token(&ctx, &settings.token_label)?;
    let session = if read_write { ctx.open_rw_session(slot) } else { ctx.open_ro_session(slot) }
        .map_err(|e| token_error(settings, "open a session", &e))?;
    match session.login(UserType::User, Some(&pin)) {
        // Login state is shared by every session of this process on the
        // token: a second provider on the same token is already logged in.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
            return Err(KeyError::Config(format!(
                "pkcs11 token {:?} refused the user PIN from {}",
                settings.token_label,
                settings.pin_file.display()
            )));
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            return Err(KeyError::Config(format!(
                "pkcs11 token {:?}: the user PIN is locked; unlock it with the SO PIN",
                settings.token_label
            )));
        }
        Err(e) => return Err(token_error(settings, "log in", &e)),
    }
    drop(pin);
    Ok((ctx, slot, session))
}

/// The CKA_LABEL of root key version `version`: version 1 is the
/// configured label itself (so a token set up before rotation existed
/// keeps working), later versions add `.v<N>`.
pub fn version_label(base: &str, version: u32) -> String {
    if version == 1 { base.to_owned() } else { format!("{base}.v{version}") }
}

fn label_version(base: &str, label: &str) -> Option<u32> {
    if label == base {
        return Some(1);
    }
    let n: u32 = label.strip_prefix(base)?.strip_prefix(".v")?.parse().ok()?;
    (n >= 2 && label == version_label(base, n)).then_some(n)
}

/// The root key versions present in the token: AES keys whose label is
/// the configured one or a versioned form of it, oldest first.
pub fn present_versions(settings: &Pkcs11Settings) -> Result<Vec<u32>, KeyError> {
    let (_ctx, _slot, session) = logged_in_session(settings, false)?;
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES)])
        .map_err(|e| token_error(settings, "list its keys", &e))?;
    let mut versions = Vec::new();
    for key in keys {
        let attrs = session
            .get_attributes(key, &[AttributeType::Label])
            .map_err(|e| token_error(settings, "read a label", &e))?;
        for attr in attrs {
            if let Attribute::Label(label) = attr
                && let Ok(label) = std::str::from_utf8(&label)
                && let Some(v) = label_version(&settings.key_label, label)
            {
                versions.push(v);
            }
        }
    }
    versions.sort_unstable();
    versions.dedup();
    Ok(versions)
}

/// Destroys the key object labelled `settings.key_label` in the token (a
/// retired root key version). Absent already counts as done, so an
/// interrupted retirement can be repeated.
pub fn destroy_key_blocking(settings: &Pkcs11Settings) -> Result<(), KeyError> {
    let (_ctx, _slot, session) = logged_in_session(settings, true)?;
    if let Some(key) = find_key(&session, settings)? {
        session.destroy_object(key).map_err(|e| token_error(settings, "destroy the retired key", &e))?;
        tracing::info!(token_label = %settings.token_label, key_label = %settings.key_label, "pkcs11 root key destroyed");
    }
    Ok(())
}

fn envelope_aad(aad: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + aad.len());
    out.push(ENVELOPE_V1);
    out.extend_from_slice(aad);
    out
}

/// Errors that mean "the token could not answer", as opposed to "this does
/// not decrypt": a shred is never verified through an unreachable token.
fn token_unreachable(e: &CkError) -> bool {
    match e {
        CkError::Pkcs11(rv, _) => matches!(
            rv,
            RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::HostMemory
                | RvError::TokenNotPresent
                | RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::KeyHandleInvalid
                | RvError::OperationActive
        ),
        _ => true,
    }
}

/// One initialised context per module per process: `C_Initialize` may be
/// called only once, and every provider of the process shares it.
fn context(module: &Path) -> Result<Pkcs11, KeyError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| KeyError::Unavailable("pkcs11 context lock poisoned".into()))?;
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| KeyError::Config(format!("cannot load the pkcs11 module {}: {e}", module.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KeyError::Config(format!("cannot initialise the pkcs11 module {}: {e}", module.display())));
        }
    }
    contexts.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

fn find_token(ctx: &Pkcs11, label: &str) -> Result<cryptoki::slot::Slot, KeyError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| KeyError::Unavailable(format!("pkcs11 cannot list slots: {e}")))?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(|e| KeyError::Unavailable(format!("pkcs11 token info: {e}")))?;
        let this = info.label().trim_end();
        if this == label {
            found.push(slot);
        }
        labels.push(format!("{this:?}"));
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(KeyError::Config(format!(
            "no pkcs11 token labelled {label:?} (initialised tokens: {})",
            if labels.is_empty() { "none".to_owned() } else { labels.join(", ") }
        ))),
        _ => Err(KeyError::Config(format!(
            "{} pkcs11 tokens are labelled {label:?}; labels must be unique",
            found.len()
        ))),
    }
}

fn key_template(settings: &Pkcs11Settings) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(settings.key_label.as_bytes().to_vec()),
    ]
}

fn find_key(session: &Session, settings: &Pkcs11Settings) -> Result<Option<ObjectHandle>, KeyError> {
    let found =
        session.find_objects(&key_template(settings)).map_err(|e| token_error(settings, "search for the key", &e))?;
    match found.as_slice() {
        [] => Ok(None),
        [key] => Ok(Some(*key)),
        _ => Err(KeyError::Config(format!(
            "{} AES keys are labelled {:?} in pkcs11 token {:?}; the root key label must be unique",
            found.len(),
            settings.key_label,
            settings.token_label
        ))),
    }
}

/// Generates the AES-256 root key inside the token: persistent, sensitive
/// and never extractable, so its value cannot be read out, even wrapped.
fn generate_key(session: &Session, settings: &Pkcs11Settings) -> Result<ObjectHandle, KeyError> {
    let id: [u8; KEY_ID_LEN] = random_bytes().map_err(|_| KeyError::Unavailable("random generator failed".into()))?;
    let mut template = key_template(settings);
    template.extend([
        Attribute::ValueLen((KEY_LEN as u64).into()),
        Attribute::Id(id.to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]);
    let key = session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| token_error(settings, "generate the key", &e))?;
    tracing::info!(token_label = %settings.token_label, key_label = %settings.key_label, "pkcs11 root key generated in the token");
    Ok(key)
}

fn token_error(settings: &Pkcs11Settings, what: &str, e: &CkError) -> KeyError {
    KeyError::Unavailable(format!("pkcs11 token {:?}: cannot {what}: {e}", settings.token_label))
}

/// Reads the user PIN; the file must not be readable by group or others.
/// (`recvault config check` runs it too.)
pub fn read_pin(path: &Path) -> Result<AuthPin, KeyError> {
    let meta =
        std::fs::metadata(path).map_err(|e| KeyError::Config(format!("root_key.pin_file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(KeyError::Config(format!("root_key.pin_file {} is not a regular file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Config(format!(
            "root_key.pin_file {} has mode {mode:04o}, readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| KeyError::Config(format!("root_key.pin_file {}: {e}", path.display())))?,
    );
    let pin = text.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return Err(KeyError::Config(format!("root_key.pin_file {} is empty", path.display())));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

#[cfg(test)]
mod tests {
    //! Run against a real SoftHSM2 token. PKCS#11 modules read their
    //! configuration (SOFTHSM2_CONF) once per process and setting the
    //! environment in a threaded test process is unsound, so each test
    //! re-runs itself in a child process whose environment points at a token
    //! created once, in a temporary directory, by the parent.

    use std::process::Command;

    use super::*;
    use crate::catalog::Catalog;
    use crate::catalog::sqlite::SqliteCatalog;
    use crate::keys::KeyService;

    const MODULES: &[&str] = &[
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ];
    const TOKEN: &str = "recvault-test";
    const CHILD: &str = "RECVAULT_SOFTHSM_CHILD";
    const DIR: &str = "RECVAULT_SOFTHSM_DIR";
    const MODULE: &str = "RECVAULT_SOFTHSM_MODULE";

    /// What a test (in the child) needs to open the token.
    struct Fixture {
        dir: PathBuf,
        module: PathBuf,
    }

    impl Fixture {
        fn settings(&self, key_label: &str, create_key: bool) -> Pkcs11Settings {
            Pkcs11Settings {
                module: self.module.clone(),
                token_label: TOKEN.into(),
                pin_file: self.dir.join("user.pin"),
                key_label: key_label.into(),
                create_key,
            }
        }
    }

    struct Token {
        dir: tempfile::TempDir,
        module: PathBuf,
    }

    /// A token of its own for each test: the tests run side by side in
    /// separate processes, and SoftHSM2's file store shared between
    /// processes that write it at once (a key created by one while another
    /// lists the slots) once made a test see no token at all.
    fn init_token() -> Option<Token> {
        let module = MODULES.iter().map(PathBuf::from).find(|p| p.exists());
        let util = Command::new("softhsm2-util").arg("--version").output().is_ok_and(|o| o.status.success());
        let Some(module) = module.filter(|_| util) else {
            if std::env::var("RECVAULT_SKIP_HSM").as_deref() == Ok("1") {
                // Straight to stderr: the test harness captures eprintln!
                // of passing tests, and this skip must be seen.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!!!!!!! SKIPPING the PKCS#11 root key tests: SoftHSM2 is not installed \
                     (RECVAULT_SKIP_HSM=1) !!!!!!!!\n"
                );
                return None;
            }
            panic!(
                "the PKCS#11 tests need SoftHSM2 (softhsm2-util and libsofthsm2.so): run `apt-get install softhsm2`, \
                 or set RECVAULT_SKIP_HSM=1 to skip them"
            );
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .expect("softhsm2.conf");
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN, "--pin", "1234", "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs");
        assert!(out.status.success(), "softhsm2-util --init-token failed: {}", String::from_utf8_lossy(&out.stderr));
        let pin = dir.path().join("user.pin");
        std::fs::write(&pin, "1234\n").expect("pin file");
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Some(Token { dir, module })
    }

    /// In the child: the fixture, so the test body runs. In the parent: runs
    /// the named test in a child against the token, and returns `None`.
    fn softhsm(test: &str) -> Option<Fixture> {
        if std::env::var(CHILD).as_deref() == Ok("1") {
            return Some(Fixture {
                dir: std::env::var_os(DIR).expect("token dir").into(),
                module: std::env::var_os(MODULE).expect("module").into(),
            });
        }
        let token = init_token()?;
        let module_path = module_path!();
        let name = format!("{}::{test}", module_path.split_once("::").map_or(module_path, |(_, rest)| rest));
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("SOFTHSM2_CONF", token.dir.path().join("softhsm2.conf"))
            .env(DIR, token.dir.path())
            .env(MODULE, &token.module)
            .output()
            .expect("child test runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name} failed against SoftHSM2:\n{stdout}\n{stderr}");
        assert!(stdout.contains("1 passed"), "{name} did not run in the child:\n{stdout}");
        None
    }

    fn test_key(byte: u8) -> SecretKey {
        let mut bytes = [byte; KEY_LEN];
        SecretKey::from_slice_zeroizing(&mut bytes).unwrap()
    }

    #[tokio::test]
    async fn the_key_is_generated_in_the_token_sensitive_and_never_extractable() {
        let Some(fx) = softhsm("the_key_is_generated_in_the_token_sensitive_and_never_extractable") else { return };
        let root = Pkcs11RootKey::open(fx.settings("attributes", true)).await.unwrap();
        assert!(root.key_id().starts_with("pkcs11:recvault-test/attributes#"), "{}", root.key_id());
        assert_eq!(root.key_id().len(), "pkcs11:recvault-test/attributes#".len() + 2 * KEY_ID_LEN);
        let session = root.inner.session.lock().unwrap();
        let attrs = session
            .get_attributes(
                root.inner.key,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::ValueLen,
                    AttributeType::Value,
                ],
            )
            .unwrap();
        let mut seen = 0;
        for attr in &attrs {
            match attr {
                Attribute::Token(v) | Attribute::Sensitive(v) | Attribute::NeverExtractable(v) => {
                    assert!(*v, "{attr:?}");
                    seen += 1;
                }
                Attribute::AlwaysSensitive(v) => {
                    assert!(*v, "{attr:?}");
                    seen += 1;
                }
                Attribute::Extractable(v) => {
                    assert!(!*v, "CKA_EXTRACTABLE must be false");
                    seen += 1;
                }
                Attribute::ValueLen(len) => {
                    assert_eq!(u64::from(*len), KEY_LEN as u64);
                    seen += 1;
                }
                Attribute::Value(_) => panic!("the token handed out the key value"),
                _ => {}
            }
        }
        assert_eq!(seen, 6, "{attrs:?}");
    }

    #[tokio::test]
    async fn wraps_and_unwraps_and_fails_opaquely() {
        let Some(fx) = softhsm("wraps_and_unwraps_and_fails_opaquely") else { return };
        let root = Pkcs11RootKey::open(fx.settings("round-trip", true)).await.unwrap();
        let key = test_key(0x5a);
        let wrapped = root.wrap(&key, b"customer 1").await.unwrap();
        assert_eq!(wrapped.len(), ENVELOPE_LEN);
        assert_eq!(wrapped[0], ENVELOPE_V1);
        assert_ne!(root.wrap(&key, b"customer 1").await.unwrap(), wrapped, "every wrap has a fresh IV");
        assert_eq!(root.unwrap(&wrapped, b"customer 1").await.unwrap().expose(), key.expose());
        assert!(matches!(root.unwrap(&wrapped, b"customer 2").await, Err(KeyError::DecryptionFailed)));
        for bit in [0, 8, 8 * 5, 8 * 13, 8 * 30, 8 * ENVELOPE_LEN - 1] {
            let mut bad = wrapped.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let err = root.unwrap(&bad, b"customer 1").await.expect_err("refused");
            assert!(matches!(err, KeyError::DecryptionFailed), "bit {bit}: {err:?}");
            assert_eq!(err.to_string(), "decryption failed");
        }
        assert!(matches!(
            root.unwrap(&wrapped[..ENVELOPE_LEN - 1], b"customer 1").await,
            Err(KeyError::DecryptionFailed)
        ));
        assert!(matches!(root.unwrap(&[], b"customer 1").await, Err(KeyError::DecryptionFailed)));
        // The token still works after failed decryptions.
        assert_eq!(root.unwrap(&wrapped, b"customer 1").await.unwrap().expose(), key.expose());
    }

    #[tokio::test]
    async fn a_second_provider_unwraps_what_the_first_wrapped() {
        let Some(fx) = softhsm("a_second_provider_unwraps_what_the_first_wrapped") else { return };
        let first = Pkcs11RootKey::open(fx.settings("persist", true)).await.unwrap();
        let key = test_key(0x11);
        let wrapped = first.wrap(&key, b"aad").await.unwrap();
        let first_id = first.key_id().to_owned();
        drop(first);
        let second = Pkcs11RootKey::open(fx.settings("persist", false)).await.unwrap();
        assert_eq!(second.key_id(), first_id, "the same key object, not a new one");
        assert_eq!(second.unwrap(&wrapped, b"aad").await.unwrap().expose(), key.expose());
    }

    #[tokio::test]
    async fn unseals_with_its_key_and_stays_sealed_with_another() {
        let Some(fx) = softhsm("unseals_with_its_key_and_stays_sealed_with_another") else { return };
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::memory().unwrap());
        let root = Arc::new(Pkcs11RootKey::open(fx.settings("unseal", true)).await.unwrap());
        KeyService::unseal(root.clone(), catalog.clone()).await.unwrap();
        let keys = KeyService::unseal(root, catalog.clone()).await.unwrap();
        let id = crate::model::CustomerId::parse("crm:hsm").unwrap();
        let (c1, k1) = keys.customer_for_ingest(&id).await.unwrap();
        let (_, k2) = keys.customer_for_ingest(&id).await.unwrap();
        assert_eq!(k1.secret().expose(), k2.secret().expose());
        assert!(keys.canary_opens(&c1).await.unwrap());
        let other = Arc::new(Pkcs11RootKey::open(fx.settings("unseal-other", true)).await.unwrap());
        let err = KeyService::unseal(other, catalog).await.err().expect("sealed");
        assert!(matches!(err, KeyError::Sealed(_)), "{err:?}");
        assert!(err.to_string().contains("pkcs11:recvault-test/unseal-other#"), "{err}");
    }

    #[tokio::test]
    async fn refuses_a_missing_key_a_wrong_pin_and_an_unknown_token() {
        let Some(fx) = softhsm("refuses_a_missing_key_a_wrong_pin_and_an_unknown_token") else { return };
        let err = Pkcs11RootKey::open(fx.settings("absent", false)).await.err().expect("refused");
        assert!(err.to_string().contains("create_key"), "{err}");
        let mut settings = fx.settings("absent", true);
        settings.token_label = "no-such-token".into();
        let err = Pkcs11RootKey::open(settings).await.err().expect("refused");
        assert!(err.to_string().contains("recvault-test"), "lists the tokens there are: {err}");
        let dir = tempfile::tempdir().unwrap();
        let wrong = dir.path().join("wrong.pin");
        std::fs::write(&wrong, "98765\n").unwrap();
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut settings = fx.settings("absent", true);
        settings.pin_file = wrong;
        let err = Pkcs11RootKey::open(settings).await.err().expect("refused").to_string();
        assert!(err.contains("refused the user PIN") && !err.contains("98765"), "{err}");
    }

    #[test]
    fn versioned_labels() {
        assert_eq!(version_label("root", 1), "root");
        assert_eq!(version_label("root", 2), "root.v2");
        assert_eq!(label_version("root", "root"), Some(1));
        assert_eq!(label_version("root", "root.v12"), Some(12));
        for other in ["root.v1", "root.v02", "root.v", "root2", "rooty.v2", "other", "root.v2x"] {
            assert_eq!(label_version("root", other), None, "{other}");
        }
    }

    #[test]
    fn the_pin_file_must_be_private_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.pin");
        std::fs::write(&path, "s3cret-pin\n").unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = read_pin(&path).expect_err("refused").to_string();
            assert!(err.contains("chmod 600") && !err.contains("s3cret"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = read_pin(&path).unwrap();
        assert!(!format!("{pin:?}").contains("s3cret"));
        let settings = Pkcs11Settings {
            module: dir.path().join("missing.so"),
            token_label: TOKEN.into(),
            pin_file: path,
            key_label: "k".into(),
            create_key: false,
        };
        let err = Pkcs11RootKey::open_blocking(&settings).err().expect("refused").to_string();
        assert!(err.contains("cannot load the pkcs11 module") && !err.contains("s3cret"), "{err}");
    }
}
