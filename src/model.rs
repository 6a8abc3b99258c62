//! Domain nouns shared by every layer: validated ids, content kinds and
//! interaction metadata. Strings from callers become these types at the edge.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value from a caller was refused. The message is for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput(msg.into())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// A customer as named by the caller's CRM: 1–128 characters of
/// `[A-Za-z0-9._:-]`. It is never used in a file or object path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if s.is_empty() || s.len() > 128 || !s.chars().all(is_id_char) {
            return Err(invalid(format!(
                "customer_id must be 1-128 characters of [A-Za-z0-9._:-], got {} characters{}",
                s.chars().count(),
                if s.chars().all(is_id_char) { "" } else { " including a character outside that set" }
            )));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_uuid(field: &str, s: &str) -> Result<uuid::Uuid, InvalidInput> {
    let parsed = uuid::Uuid::try_parse(s).ok().filter(|u| {
        // Only the canonical lowercase hyphenated form, so two spellings can
        // never name two different uploads (G7).
        u.hyphenated().to_string() == s
    });
    match parsed {
        Some(u) if !u.is_nil() => Ok(u),
        Some(_) => Err(invalid(format!("{field} must not be the nil UUID"))),
        None => Err(invalid(format!(
            "{field} must be a UUID in lowercase hyphenated form (e.g. 0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b), got {:?}",
            s.chars().take(64).collect::<String>()
        ))),
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(uuid::Uuid);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, InvalidInput> {
                parse_uuid($field, s).map(Self)
            }

            pub fn new_random() -> Self {
                Self(uuid::Uuid::new_v4())
            }

            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A committed (or to-be-committed) object; chosen by the server.
    ObjectId,
    "object_id"
);
uuid_id!(
    /// An upload, chosen by the client: the idempotency and resume key.
    UploadId,
    "upload_id"
);

impl UploadId {
    /// An upload id sent by a client. Version 8 UUIDs are the server's
    /// own: it derives the ids of the items it makes itself (a
    /// transcript's redacted rendition) in that version, which no random
    /// (version 4) or time-ordered (version 7) id has. A client that could
    /// take one could put its own bytes where the server will look for
    /// the redacted copy of a transcript.
    pub fn parse_client(s: &str) -> Result<Self, InvalidInput> {
        let id = Self::parse(s)?;
        if id.0.get_version_num() == 8 {
            return Err(invalid(format!(
                "upload_id {s} is a version 8 UUID, which this server keeps for the ids it derives itself; \
                 use a random (version 4) UUID"
            )));
        }
        Ok(id)
    }
}
uuid_id!(
    /// A legal hold; chosen by the server.
    HoldId,
    "hold_id"
);
uuid_id!(
    /// The internal id of a customer's key ring. It appears in object
    /// headers instead of the CRM customer id.
    CustomerRef,
    "customer_ref"
);

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentKind {
    CallRecording,
    ChatTranscript,
    Image,
}

impl ContentKind {
    pub const ALL: [ContentKind; 3] = [Self::CallRecording, Self::ChatTranscript, Self::Image];

    /// Stable code used in the object header and the catalog. Do not change.
    pub fn code(self) -> u8 {
        match self {
            Self::CallRecording => 1,
            Self::ChatTranscript => 2,
            Self::Image => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name used by the CLI and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::CallRecording => "call-recording",
            Self::ChatTranscript => "chat-transcript",
            Self::Image => "image",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for ContentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why content is read: declared with every read and kept in the audit
/// trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Purpose {
    /// Not declared (accepted until roles are enforced; recorded as such).
    #[default]
    Unspecified,
    Coaching,
    QualityReview,
    Legal,
    DataSubjectRequest,
}

impl Purpose {
    pub const ALL: [Purpose; 5] =
        [Self::Unspecified, Self::Coaching, Self::QualityReview, Self::Legal, Self::DataSubjectRequest];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Coaching => "coaching",
            Self::QualityReview => "quality-review",
            Self::Legal => "legal",
            Self::DataSubjectRequest => "data-subject-request",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl Purpose {
    /// Purposes that use content to train staff: refused for customers who
    /// opted out of training use.
    pub fn is_training(self) -> bool {
        matches!(self, Self::Coaching | Self::QualityReview)
    }
}

/// What a caller may do: each role opens a set of RPCs (the permission
/// table in `auth`, documented in docs/ACCESS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Uploads only (telephony and chat platforms): cannot read or list.
    Ingest,
    /// Training team: search, sample and read content of consented
    /// customers for coaching or quality review; no shredding.
    Coach,
    /// Privacy officer / retention job: policies, holds, shreds, consent;
    /// metadata but never content.
    Retention,
    /// Tokens and configuration; never content without the break-glass
    /// grant.
    Admin,
    /// Reads the audit trail and shred certificates only.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 5] = [Self::Ingest, Self::Coach, Self::Retention, Self::Admin, Self::Auditor];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Coach => "coach",
            Self::Retention => "retention",
            Self::Admin => "admin",
            Self::Auditor => "auditor",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A bearer token as stored: only a hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public part of the token (`rvt_<token_id>_<secret>`), 32 hex digits.
    pub token_id: String,
    /// The principal the token authenticates, e.g. `telephony-1`.
    pub name: String,
    pub roles: Vec<Role>,
    /// Break-glass: may read unredacted content and read for legal and
    /// data-subject-request purposes.
    pub unredacted: bool,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

/// A customer's consent to the use of their content for training
/// (coaching and quality review).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    pub customer_id: CustomerId,
    pub training_use: bool,
    pub updated_by: String,
    pub updated_at_ms: i64,
}

/// Direction of an interaction, seen from the contact centre.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    #[default]
    Unspecified,
    Inbound,
    Outbound,
    Internal,
}

impl Direction {
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::Inbound => 1,
            Self::Outbound => 2,
            Self::Internal => 3,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Inbound,
            2 => Self::Outbound,
            3 => Self::Internal,
            _ => Self::Unspecified,
        }
    }
}

/// Limits on caller-supplied metadata (G8).
pub const MAX_META_STRING: usize = 256;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_KEY: usize = 64;

/// The support interaction an object belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Interaction {
    pub interaction_id: String,
    pub channel: String,
    pub agent_id: String,
    pub queue: String,
    pub direction: Direction,
    /// Milliseconds since the Unix epoch, if known.
    pub started_at_ms: Option<i64>,
    pub tags: BTreeMap<String, String>,
    /// How long the interaction lasted, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

fn check_meta(field: &str, value: &str) -> Result<(), InvalidInput> {
    if value.len() > MAX_META_STRING {
        return Err(invalid(format!("{field} is {} bytes; at most {MAX_META_STRING} allowed", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains a control character")));
    }
    Ok(())
}

impl Interaction {
    /// Checks every field against the metadata limits.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        check_meta("interaction.interaction_id", &self.interaction_id)?;
        check_meta("interaction.channel", &self.channel)?;
        check_meta("interaction.agent_id", &self.agent_id)?;
        check_meta("interaction.queue", &self.queue)?;
        if self.tags.len() > MAX_TAGS {
            return Err(invalid(format!("{} tags given; at most {MAX_TAGS} allowed", self.tags.len())));
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.len() > MAX_TAG_KEY || !k.chars().all(is_id_char) {
                return Err(invalid(format!(
                    "tag key {:?} must be 1-{MAX_TAG_KEY} characters of [A-Za-z0-9._:-]",
                    k.chars().take(80).collect::<String>()
                )));
            }
            check_meta(&format!("tag {k}"), v)?;
        }
        Ok(())
    }
}

/// What is being stored: everything given when an upload opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub customer_id: CustomerId,
    pub kind: ContentKind,
    /// Normalised MIME type (lowercase essence, parameters kept).
    pub content_type: String,
    pub interaction: Interaction,
    /// Time spans of a recording that coaches must not hear (a card number
    /// read out): silenced on playback without the unredacted grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive_spans: Vec<TimeSpan>,
}

/// A half-open span of a recording's time line, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimeSpan {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Most sensitive spans one object may carry.
pub const MAX_SENSITIVE_SPANS: usize = 1000;

impl TimeSpan {
    /// Checks spans from a caller: each ends after it starts, and there are
    /// not too many.
    pub fn validate(spans: &[TimeSpan]) -> Result<(), InvalidInput> {
        if spans.len() > MAX_SENSITIVE_SPANS {
            return Err(invalid(format!("at most {MAX_SENSITIVE_SPANS} sensitive spans per object")));
        }
        if let Some(bad) = spans.iter().find(|s| s.end_ms <= s.start_ms) {
            return Err(invalid(format!(
                "a sensitive span must end after it starts (got {}..{} ms)",
                bad.start_ms, bad.end_ms
            )));
        }
        Ok(())
    }

    /// The union of two span lists, sorted, overlapping spans merged.
    pub fn merge(a: &[TimeSpan], b: &[TimeSpan]) -> Vec<TimeSpan> {
        let mut all: Vec<TimeSpan> = a.iter().chain(b).copied().collect();
        all.sort();
        let mut out: Vec<TimeSpan> = Vec::with_capacity(all.len());
        for s in all {
            match out.last_mut() {
                Some(last) if s.start_ms <= last.end_ms => last.end_ms = last.end_ms.max(s.end_ms),
                _ => out.push(s),
            }
        }
        out
    }
}

/// A committed object as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    pub object_id: ObjectId,
    pub upload_id: UploadId,
    pub spec: ObjectSpec,
    pub size: u64,
    pub sha256: [u8; 32],
    pub created_at_ms: i64,
    /// Fixed at commit by the retention policies then in force.
    pub retention: Retention,
    /// The object this one was made from (a redacted transcript, a
    /// thumbnail); always of the same customer, under the same key.
    pub derived_from: Option<ObjectId>,
}

/// When an object expires, and which policy said so. `policy` is empty and
/// `expires_at_ms` is `None` when no policy matched: the object is kept
/// until its customer is shredded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub policy: String,
    pub expires_at_ms: Option<i64>,
}

/// A retention rule: objects of `kind` (and, when given, of this queue,
/// channel or tag) are kept for `retain_secs` after commit. When several
/// match an object, the longest wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    pub name: String,
    pub kind: ContentKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// `(key, value)`: the object must carry this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<(String, String)>,
    pub retain_secs: u64,
}

/// Longest retention a policy may set (100 years): beyond it, "keep until
/// shred" is the honest setting (no policy).
pub const MAX_RETAIN_SECS: u64 = 100 * 365 * 86_400;

impl RetentionPolicy {
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(is_id_char) {
            return Err(invalid("policy name must be 1-64 characters of [A-Za-z0-9._:-]"));
        }
        if self.retain_secs == 0 || self.retain_secs > MAX_RETAIN_SECS {
            return Err(invalid(format!(
                "policy {}: retention must be between 1 second and 100 years, got {} seconds",
                self.name, self.retain_secs
            )));
        }
        for (field, value) in [("queue", &self.queue), ("channel", &self.channel)] {
            if let Some(v) = value {
                if v.is_empty() {
                    return Err(invalid(format!("policy {}: {field} is empty; omit it to match any", self.name)));
                }
                check_meta(&format!("policy {} {field}", self.name), v)?;
            }
        }
        if let Some((k, v)) = &self.tag {
            if k.is_empty() || k.len() > MAX_TAG_KEY || !k.chars().all(is_id_char) {
                return Err(invalid(format!(
                    "policy {}: tag key must be 1-{MAX_TAG_KEY} characters of [A-Za-z0-9._:-]",
                    self.name
                )));
            }
            check_meta(&format!("policy {} tag {k}", self.name), v)?;
        }
        Ok(())
    }

    /// Whether this policy applies to an object of this spec.
    pub fn matches(&self, spec: &ObjectSpec) -> bool {
        let i = &spec.interaction;
        self.kind == spec.kind
            && self.queue.as_ref().is_none_or(|q| *q == i.queue)
            && self.channel.as_ref().is_none_or(|c| *c == i.channel)
            && self.tag.as_ref().is_none_or(|(k, v)| i.tags.get(k) == Some(v))
    }

    /// The retention of an object committed at `created_at_ms`: the longest
    /// of the matching policies (ties broken by name, so the choice is
    /// stable).
    pub fn assign(policies: &[RetentionPolicy], spec: &ObjectSpec, created_at_ms: i64) -> Retention {
        policies
            .iter()
            .filter(|p| p.matches(spec))
            .max_by(|a, b| a.retain_secs.cmp(&b.retain_secs).then_with(|| b.name.cmp(&a.name)))
            .map(|p| Retention {
                policy: p.name.clone(),
                expires_at_ms: Some(created_at_ms.saturating_add((p.retain_secs as i64).saturating_mul(1000))),
            })
            .unwrap_or_default()
    }
}

/// A legal hold: while it is in force, nothing it covers expires and its
/// customer cannot be shredded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub hold_id: HoldId,
    pub customer_id: CustomerId,
    /// `None`: the whole customer; otherwise one interaction of it.
    pub interaction_id: Option<String>,
    pub case_ref: String,
    pub reason: String,
    pub placed_by: String,
    pub placed_at_ms: i64,
    pub released_by: Option<String>,
    pub released_at_ms: Option<i64>,
}

impl Hold {
    pub fn is_active(&self) -> bool {
        self.released_at_ms.is_none()
    }

    /// "hold <id> (case <ref>)" for messages.
    pub fn describe(&self) -> String {
        match &self.interaction_id {
            Some(i) => format!("legal hold {} (case {}) on interaction {i}", self.hold_id, self.case_ref),
            None => format!("legal hold {} (case {})", self.hold_id, self.case_ref),
        }
    }
}

/// Checks a free-text field given by a person (reason, case reference,
/// requester name): required, bounded, no control characters.
pub fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), InvalidInput> {
    if value.trim().is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    if value.chars().count() > max_chars {
        return Err(invalid(format!("{field} is limited to {max_chars} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains a control character")));
    }
    Ok(())
}

/// A time in milliseconds since the Unix epoch, as RFC 3339 (UTC).
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g7_uuid_forms() {
        let canonical = "0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b";
        assert!(UploadId::parse(canonical).is_ok());
        for bad in [
            "0B7C2F1E-8D4A-4F7E-9A51-3C2D1E0F9A8B",
            "0b7c2f1e8d4a4f7e9a513c2d1e0f9a8b",
            "{0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8b}",
            "00000000-0000-0000-0000-000000000000",
            "0b7c2f1e-8d4a-4f7e-9a51-3c2d1e0f9a8",
            "",
            "../../etc/passwd",
        ] {
            assert!(UploadId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn customer_ids() {
        assert!(CustomerId::parse("crm:ACME-42_x.y").is_ok());
        assert!(CustomerId::parse(&"a".repeat(128)).is_ok());
        for bad in ["", "a/b", "../x", "a b", "ünï", &"a".repeat(129)] {
            assert!(CustomerId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn longest_matching_policy_wins() {
        let p = |name: &str, kind, days: u64| RetentionPolicy {
            name: name.into(),
            kind,
            queue: None,
            channel: None,
            tag: None,
            retain_secs: days * 86_400,
        };
        let mut vip = p("vip", ContentKind::CallRecording, 365);
        vip.queue = Some("vip".into());
        let mut disputed = p("disputed", ContentKind::CallRecording, 730);
        disputed.tag = Some(("dispute".into(), "yes".into()));
        let policies =
            vec![p("calls", ContentKind::CallRecording, 90), p("images", ContentKind::Image, 30), vip, disputed];
        let mut spec = ObjectSpec {
            customer_id: CustomerId::parse("c").unwrap(),
            kind: ContentKind::CallRecording,
            content_type: "audio/wav".into(),
            interaction: Interaction::default(),
            sensitive_spans: Vec::new(),
        };
        let day = 86_400_000;
        assert_eq!(
            RetentionPolicy::assign(&policies, &spec, 0),
            Retention { policy: "calls".into(), expires_at_ms: Some(90 * day) }
        );
        spec.interaction.queue = "vip".into();
        assert_eq!(RetentionPolicy::assign(&policies, &spec, 0).policy, "vip");
        spec.interaction.tags.insert("dispute".into(), "yes".into());
        assert_eq!(RetentionPolicy::assign(&policies, &spec, 0).expires_at_ms, Some(730 * day));
        spec.kind = ContentKind::ChatTranscript;
        assert_eq!(RetentionPolicy::assign(&policies, &spec, 0), Retention::default());
        assert!(p("", ContentKind::Image, 1).validate().is_err());
        assert!(p("x", ContentKind::Image, 0).validate().is_err());
        assert!(p("x", ContentKind::Image, 1).validate().is_ok());
    }

    #[test]
    fn sensitive_spans_merge_and_validate() {
        let s = |a, b| TimeSpan { start_ms: a, end_ms: b };
        assert_eq!(TimeSpan::merge(&[s(5, 9), s(0, 2)], &[s(8, 12), s(20, 21)]), vec![s(0, 2), s(5, 12), s(20, 21)]);
        assert!(TimeSpan::validate(&[s(1, 2)]).is_ok());
        assert!(TimeSpan::validate(&[s(2, 2)]).is_err());
        assert!(TimeSpan::validate(&vec![s(1, 2); MAX_SENSITIVE_SPANS + 1]).is_err());
    }

    #[test]
    fn g8_metadata_limits() {
        let mut i = Interaction::default();
        assert!(i.validate().is_ok());
        i.agent_id = "x".repeat(257);
        assert!(i.validate().is_err());
        i.agent_id = "a\u{0}b".into();
        assert!(i.validate().is_err());
        i.agent_id.clear();
        i.tags = (0..33).map(|n| (format!("k{n}"), String::new())).collect();
        assert!(i.validate().is_err());
        i.tags = [("../x".to_string(), "v".to_string())].into();
        assert!(i.validate().is_err());
    }
}
