//! Content checks: the declared MIME type is canonicalised per kind, and the
//! bytes must look like it (magic numbers, image dimensions, UTF-8 text,
//! JSON). Checks run as bytes arrive, so a mismatch fails the upload before
//! any more of it is stored (G4, G5).

use std::fmt;

use crate::model::{ContentKind, InvalidInput};

/// Caps on the dimensions an image header may declare (decompression bombs,
/// G5). Only headers are read; pixels are never decoded here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SniffLimits {
    /// Largest accepted width in pixels.
    pub max_image_width: u32,
    /// Largest accepted height in pixels.
    pub max_image_height: u32,
    /// Largest accepted `width * height`.
    pub max_image_pixels: u64,
}

impl Default for SniffLimits {
    fn default() -> Self {
        Self { max_image_width: 16384, max_image_height: 16384, max_image_pixels: 100_000_000 }
    }
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// JSON transcripts are parsed whole at finish; this bounds the buffer. The
/// ingest size cap for transcripts is the same, so this only guards misuse.
const MAX_JSON: usize = 16 << 20;
/// Head bytes kept for audio: enough for every magic number and for
/// [`guess_content_type`] to name what a mismatching upload looks like.
const MAX_AUDIO_HEAD: usize = 64;
/// Head bytes of an image buffered to find its dimensions (a JPEG's frame
/// header may follow large APPn/EXIF segments).
const MAX_IMAGE_HEAD: usize = 64 << 10;

fn accepted(kind: ContentKind) -> &'static [&'static str] {
    match kind {
        ContentKind::CallRecording => &[
            "audio/wav",
            "audio/mpeg",
            "audio/ogg",
            "audio/opus",
            "audio/flac",
            "audio/basic",
            "audio/pcmu",
            "audio/pcma",
        ],
        ContentKind::ChatTranscript => &[TEXT_PLAIN, JSON],
        ContentKind::Image => &["image/png", "image/jpeg", "image/webp", "image/gif"],
    }
}

fn not_accepted(kind: ContentKind, declared: &str) -> InvalidInput {
    InvalidInput(format!(
        "content_type {declared:?} is not accepted for {}: use one of {}",
        kind.name(),
        accepted(kind).join(", ")
    ))
}

/// Canonicalises a declared MIME type for a kind, or explains what is
/// accepted.
///
/// Matching is case-insensitive and common aliases map to one spelling
/// (`audio/x-wav` → `audio/wav`, `image/jpg` → `image/jpeg`, …), so that a
/// reused upload id compares equal however the client spelled the type.
/// Parameters are dropped, except `charset` on transcripts, which must be
/// UTF-8; `text/plain` is always stored as `text/plain; charset=utf-8`.
pub fn normalise_content_type(kind: ContentKind, declared: &str) -> Result<String, InvalidInput> {
    let lower = declared.trim().to_ascii_lowercase();
    let mut parts = lower.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    if essence.is_empty() {
        return Err(InvalidInput(format!(
            "content_type is required for {}: one of {}",
            kind.name(),
            accepted(kind).join(", ")
        )));
    }
    let charset = parts
        .filter_map(|p| p.split_once('='))
        .find(|(name, _)| name.trim() == "charset")
        .map(|(_, value)| value.trim().trim_matches('"').to_owned());
    let canonical = match essence {
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" | "audio/wav" => "audio/wav",
        "audio/mp3" | "audio/mpeg" => "audio/mpeg",
        "audio/x-flac" | "audio/flac" => "audio/flac",
        "image/jpg" | "image/pjpeg" | "image/jpeg" => "image/jpeg",
        "text/plain" => TEXT_PLAIN,
        other => other,
    };
    let Some(canonical) = accepted(kind).iter().find(|t| **t == canonical) else {
        return Err(not_accepted(kind, declared));
    };
    if kind == ContentKind::ChatTranscript
        && let Some(cs) = charset
        && cs != "utf-8"
        && cs != "utf8"
    {
        return Err(InvalidInput(format!(
            "transcripts must be UTF-8: charset {cs:?} is not accepted; convert the transcript and declare {canonical}"
        )));
    }
    Ok((*canonical).to_owned())
}

/// Best guess of a type from the first bytes, among the types of `kind`.
///
/// Used by the CLI when no content type is given; `None` when the bytes say
/// nothing (raw μ-law/A-law audio has no header).
pub fn guess_content_type(kind: ContentKind, head: &[u8]) -> Option<&'static str> {
    let guess = guess_any(head)?;
    accepted(kind).contains(&guess).then_some(guess)
}

/// Best guess among every accepted type, whatever the kind (to name what a
/// mismatching upload looks like).
fn guess_any(h: &[u8]) -> Option<&'static str> {
    if h.len() >= 12 && &h[..4] == b"RIFF" && &h[8..12] == b"WAVE" {
        Some("audio/wav")
    } else if h.len() >= 12 && &h[..4] == b"RIFF" && &h[8..12] == b"WEBP" {
        Some("image/webp")
    } else if h.starts_with(b"OggS") {
        // The first page of an Ogg Opus stream carries the "OpusHead" packet.
        if h.windows(8).take(64).any(|w| w == b"OpusHead") { Some("audio/opus") } else { Some("audio/ogg") }
    } else if h.starts_with(b"fLaC") {
        Some("audio/flac")
    } else if h.starts_with(b"ID3") || (h.len() >= 2 && h[0] == 0xFF && h[1] & 0xE0 == 0xE0 && h[1] != 0xFF) {
        // 0xFF 0xFF is excluded from the guess: it is μ-law silence, far more
        // likely than an MPEG-1 layer I frame.
        Some("audio/mpeg")
    } else if h.starts_with(b".snd") {
        Some("audio/basic")
    } else if h.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if h.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if h.starts_with(b"GIF87a") || h.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if looks_like_json(h) {
        Some(JSON)
    } else if looks_like_text(h) {
        Some(TEXT_PLAIN)
    } else {
        None
    }
}

fn strip_bom(h: &[u8]) -> &[u8] {
    h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h)
}

/// An object or array that parses, or is a valid prefix of one (the head may
/// be cut anywhere). A chat log opening with "[10:02] agent:" is not JSON.
fn looks_like_json(h: &[u8]) -> bool {
    let body = strip_bom(h);
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    if *first != b'{' && *first != b'[' {
        return false;
    }
    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        Ok(_) => true,
        Err(e) => e.is_eof(),
    }
}

/// UTF-8 without NUL bytes; the head may end inside a character.
fn looks_like_text(h: &[u8]) -> bool {
    let valid = match std::str::from_utf8(h) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    };
    !h.is_empty() && valid && !h.contains(&0)
}

/// How many head bytes the magic check of a binary type needs; `None` for a
/// type that is not a (normalised) audio or image type.
fn magic_len(t: &str) -> Option<usize> {
    Some(match t {
        "audio/wav" | "image/webp" => 12,
        "image/png" => 8,
        "image/gif" => 6,
        "audio/ogg" | "audio/opus" | "audio/flac" => 4,
        "audio/mpeg" | "image/jpeg" => 3,
        // Raw μ-law/A-law has no header, and audio/basic may be raw μ-law
        // as well as a Sun ".snd" file: any bytes are accepted.
        "audio/basic" | "audio/pcmu" | "audio/pcma" => 0,
        _ => return None,
    })
}

/// Whether the head (at least `magic_len(t)` bytes) starts like `t`.
fn magic_ok(t: &str, h: &[u8]) -> bool {
    match t {
        "audio/wav" => h.starts_with(b"RIFF") && h.get(8..12) == Some(b"WAVE"),
        "image/webp" => h.starts_with(b"RIFF") && h.get(8..12) == Some(b"WEBP"),
        "audio/ogg" | "audio/opus" => h.starts_with(b"OggS"),
        "audio/flac" => h.starts_with(b"fLaC"),
        "audio/mpeg" => h.starts_with(b"ID3") || matches!(h, [0xFF, b, ..] if b & 0xE0 == 0xE0),
        "image/png" => h.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => h.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => h.starts_with(b"GIF87a") || h.starts_with(b"GIF89a"),
        _ => true,
    }
}

/// What the start of a `t` should be, for a message when the bytes match no
/// known type.
fn expected_magic(t: &str) -> &'static str {
    match t {
        "audio/wav" => "a RIFF/WAVE header",
        "image/webp" => "a RIFF/WEBP header",
        "audio/ogg" | "audio/opus" => "an Ogg page (\"OggS\")",
        "audio/flac" => "\"fLaC\"",
        "audio/mpeg" => "an ID3 tag or an MPEG frame sync",
        "image/png" => "the PNG signature",
        "image/jpeg" => "a JPEG start-of-image marker (FF D8 FF)",
        "image/gif" => "\"GIF87a\" or \"GIF89a\"",
        _ => "its header",
    }
}

fn mismatch(content_type: &str, head: &[u8]) -> InvalidInput {
    match guess_any(head) {
        Some(g) => InvalidInput(format!("declared {content_type} but the content looks like {g}")),
        None => InvalidInput(format!(
            "declared {content_type} but the content does not start with {} and looks like no accepted type",
            expected_magic(content_type)
        )),
    }
}

fn check_dims(content_type: &str, limits: &SniffLimits, w: u64, h: u64) -> Result<(), InvalidInput> {
    if w == 0 || h == 0 {
        return Err(InvalidInput(format!("declared {content_type} but the image has no pixels ({w}x{h})")));
    }
    if w > u64::from(limits.max_image_width)
        || h > u64::from(limits.max_image_height)
        || w.saturating_mul(h) > limits.max_image_pixels
    {
        return Err(InvalidInput(format!(
            "image is {w}x{h} pixels; the cap is {}x{} and {} pixels in all",
            limits.max_image_width, limits.max_image_height, limits.max_image_pixels
        )));
    }
    Ok(())
}

/// Streaming UTF-8 validation: a character split across chunks is carried
/// (at most 3 bytes) until its end arrives. NUL bytes are refused too:
/// binary content declared as a transcript.
#[derive(Default)]
struct Utf8Stream {
    carry: [u8; 4],
    carry_len: usize,
}

fn invalid_utf8(offset: u64) -> InvalidInput {
    InvalidInput(format!("transcripts must be UTF-8: invalid byte sequence at offset {offset}"))
}

impl Utf8Stream {
    /// Checks `data`, which starts at byte `offset` of the content.
    fn feed(&mut self, mut data: &[u8], mut offset: u64) -> Result<(), InvalidInput> {
        if self.carry_len > 0 {
            let start = offset - self.carry_len as u64;
            // The carry is a valid prefix of one character, so its lead byte
            // gives the width.
            let width = match self.carry[0] {
                0xF0.. => 4,
                0xE0.. => 3,
                _ => 2,
            };
            let take = (width - self.carry_len).min(data.len());
            let n = self.carry_len + take;
            self.carry[self.carry_len..n].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&self.carry[..n]) {
                Ok(_) => self.carry_len = 0,
                // Still short of the width: `data` is used up.
                Err(e) if e.error_len().is_none() => {
                    self.carry_len = n;
                    return Ok(());
                }
                Err(_) => return Err(invalid_utf8(start)),
            }
            data = &data[take..];
            offset += take as u64;
        }
        let (valid, error) = match std::str::from_utf8(data) {
            Ok(_) => (data.len(), None),
            Err(e) => (e.valid_up_to(), Some(e.error_len())),
        };
        // NUL is valid UTF-8, so one before the first invalid byte is the
        // earlier problem.
        if let Some(i) = data[..valid].iter().position(|&b| b == 0) {
            return Err(InvalidInput(format!(
                "transcripts must be text: found a NUL byte at offset {}",
                offset + i as u64
            )));
        }
        match error {
            None => Ok(()),
            Some(None) => {
                let tail = &data[valid..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len();
                Ok(())
            }
            Some(Some(_)) => Err(invalid_utf8(offset + valid as u64)),
        }
    }

    /// Refuses content that ends inside a character; `end` is its length.
    fn finish(&self, end: u64) -> Result<(), InvalidInput> {
        if self.carry_len == 0 {
            Ok(())
        } else {
            Err(InvalidInput(format!(
                "transcripts must be UTF-8: the content ends inside a character at offset {}",
                end - self.carry_len as u64
            )))
        }
    }
}

enum Stage {
    /// Audio or image: buffering the head until the magic (and an image's
    /// dimensions) can be checked.
    Head(Vec<u8>),
    /// Head verified: nothing more to check, `update` is O(1).
    Done,
    /// `text/plain; charset=utf-8`.
    Text(Utf8Stream),
    /// `application/json`: UTF-8 as it arrives, and the body kept for a
    /// parse at finish.
    Json { utf8: Utf8Stream, body: Vec<u8> },
    /// A type that was not normalised: nothing can vouch for the bytes.
    Unknown,
    /// An earlier update was refused.
    Failed,
}

/// Checks one upload's bytes, as they arrive, against its content type.
///
/// Feed every byte in order to [`update`](Self::update), then call
/// [`finish`](Self::finish). Audio costs a 64-byte head buffer, images at
/// most 64 KiB of head, text a 3-byte carry; only JSON is buffered whole
/// (up to 16 MiB) to be parsed at the end.
pub struct ContentChecker {
    content_type: String,
    limits: SniffLimits,
    stage: Stage,
    /// Bytes received so far.
    seen: u64,
}

impl fmt::Debug for ContentChecker {
    // Never prints buffered content: a JSON body is transcript text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Head(_) => "head",
            Stage::Done => "done",
            Stage::Text(_) => "text",
            Stage::Json { .. } => "json",
            Stage::Unknown => "unknown",
            Stage::Failed => "failed",
        };
        f.debug_struct("ContentChecker")
            .field("content_type", &self.content_type)
            .field("stage", &stage)
            .field("seen", &self.seen)
            .finish()
    }
}

impl ContentChecker {
    /// A checker for `content_type`, which must already be the output of
    /// [`normalise_content_type`]; any other type fails the first update or
    /// the finish.
    pub fn new(content_type: &str, limits: SniffLimits) -> Self {
        let stage = match content_type {
            TEXT_PLAIN => Stage::Text(Utf8Stream::default()),
            JSON => Stage::Json { utf8: Utf8Stream::default(), body: Vec::new() },
            t if magic_len(t).is_some() => Stage::Head(Vec::new()),
            _ => Stage::Unknown,
        };
        Self { content_type: content_type.to_owned(), limits, stage, seen: 0 }
    }

    /// Checks the next bytes; fails as soon as the content cannot match its
    /// type (for a binary type, as soon as its magic bytes have arrived).
    /// After a failure every later call fails too.
    pub fn update(&mut self, data: &[u8]) -> Result<(), InvalidInput> {
        let r = self.update_inner(data);
        if r.is_err() {
            self.stage = Stage::Failed;
        }
        self.seen += data.len() as u64;
        r
    }

    fn update_inner(&mut self, data: &[u8]) -> Result<(), InvalidInput> {
        let Self { content_type, limits, stage, seen } = self;
        match stage {
            Stage::Done => Ok(()),
            Stage::Text(utf8) => utf8.feed(data, *seen),
            Stage::Json { utf8, body } => {
                if body.len() + data.len() > MAX_JSON {
                    return Err(InvalidInput(format!(
                        "JSON transcripts are limited to {MAX_JSON} bytes (16 MiB); this one is larger"
                    )));
                }
                utf8.feed(data, *seen)?;
                body.extend_from_slice(data);
                Ok(())
            }
            Stage::Head(head) => {
                let is_image = content_type.starts_with("image/");
                let need = magic_len(content_type).unwrap_or_default();
                let max = if is_image { MAX_IMAGE_HEAD } else { MAX_AUDIO_HEAD };
                let room = max.saturating_sub(head.len()).min(data.len());
                head.extend_from_slice(&data[..room]);
                if head.len() < need || head.is_empty() {
                    return Ok(());
                }
                if !magic_ok(content_type, head) {
                    return Err(mismatch(content_type, head));
                }
                if !is_image {
                    *stage = Stage::Done;
                    return Ok(());
                }
                match imagesize::blob_size(head) {
                    Ok(size) => {
                        check_dims(content_type, limits, size.width as u64, size.height as u64)?;
                        *stage = Stage::Done;
                        Ok(())
                    }
                    Err(_) if head.len() < MAX_IMAGE_HEAD => Ok(()),
                    Err(_) => Err(InvalidInput(format!(
                        "declared {content_type} but its dimensions are not in the first {MAX_IMAGE_HEAD} bytes; the image looks malformed"
                    ))),
                }
            }
            Stage::Unknown => Err(unknown_type(content_type)),
            Stage::Failed => Err(InvalidInput("the content was already refused".into())),
        }
    }

    /// Final checks once every byte has been seen: content too short for
    /// its type, an image whose size never appeared, text ending inside a
    /// character, JSON that does not parse. Only `text/plain` may be empty.
    pub fn finish(self) -> Result<(), InvalidInput> {
        if self.seen == 0 && !matches!(self.stage, Stage::Text(_) | Stage::Unknown) {
            return Err(InvalidInput(format!(
                "the content is empty; {} cannot be empty (only a text/plain transcript can)",
                self.content_type
            )));
        }
        match self.stage {
            Stage::Done => Ok(()),
            Stage::Head(head) => {
                if head.len() < magic_len(&self.content_type).unwrap_or_default() {
                    Err(InvalidInput(format!(
                        "declared {} but the content is only {} bytes, too short to be one",
                        self.content_type, self.seen
                    )))
                } else {
                    // Magic verified but an image's dimensions never appeared
                    // (audio always leaves the head stage once it has bytes).
                    Err(InvalidInput(format!(
                        "declared {} but its dimensions could not be read; the image looks truncated or malformed",
                        self.content_type
                    )))
                }
            }
            Stage::Text(utf8) => utf8.finish(self.seen),
            Stage::Json { utf8, body } => {
                utf8.finish(self.seen)?;
                serde_json::from_slice::<serde::de::IgnoredAny>(strip_bom(&body))
                    .map(|_| ())
                    .map_err(|e| InvalidInput(format!("declared application/json but the content is not JSON: {e}")))
            }
            Stage::Unknown => Err(unknown_type(&self.content_type)),
            Stage::Failed => Err(InvalidInput("the content was already refused".into())),
        }
    }
}

fn unknown_type(content_type: &str) -> InvalidInput {
    InvalidInput(format!("content type {content_type:?} is not one whose content can be checked"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn check(t: &str, data: &[u8]) -> Result<(), InvalidInput> {
        let mut c = ContentChecker::new(t, SniffLimits::default());
        c.update(data)?;
        c.finish()
    }

    fn check_bytewise(t: &str, data: &[u8]) -> Result<(), InvalidInput> {
        let mut c = ContentChecker::new(t, SniffLimits::default());
        for b in data {
            c.update(std::slice::from_ref(b))?;
        }
        c.finish()
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    /// A JPEG whose frame header follows `app_bytes` of APP1 payload.
    fn jpeg_after(app_bytes: usize, w: u16, h: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        let mut left = app_bytes;
        while left > 0 {
            let n = left.min(65533);
            v.extend_from_slice(&[0xFF, 0xE1]);
            v.extend_from_slice(&((n + 2) as u16).to_be_bytes());
            v.extend(std::iter::repeat_n(0u8, n));
            left -= n;
        }
        v.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
        v
    }

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0];
        v.extend_from_slice(&jpeg_after(0, w, h)[2..]);
        v
    }

    fn wav() -> Vec<u8> {
        let mut v = b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec();
        v.extend_from_slice(&[0; 32]);
        v
    }

    fn ogg_opus() -> Vec<u8> {
        b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00OpusHead".to_vec()
    }

    fn gif(w: u16, h: u16) -> Vec<u8> {
        let mut v = b"GIF89a".to_vec();
        v.extend_from_slice(&w.to_le_bytes());
        v.extend_from_slice(&h.to_le_bytes());
        v.extend_from_slice(b"\x00\x00\x00;");
        v
    }

    fn webp() -> Vec<u8> {
        b"RIFF\x1a\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00\x7f\x02\x00\xdf\x01\x00\x00\x00".to_vec()
    }

    fn positive_cases() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("audio/wav", wav()),
            ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec()),
            ("audio/mpeg", vec![0xFF, 0xFB, 0x90, 0x00]),
            ("audio/ogg", b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01vorbis".to_vec()),
            ("audio/ogg", ogg_opus()),
            ("audio/opus", ogg_opus()),
            ("audio/flac", b"fLaC\x00\x00\x00\x22".to_vec()),
            ("audio/basic", b".snd\x00\x00\x00\x18\xff\xff\xff\xff\x00\x00\x00\x01".to_vec()),
            ("audio/basic", vec![0xFF, 0x7F, 0x00]),
            ("audio/pcmu", vec![0x13; 160]),
            ("audio/pcmu", wav()),
            ("audio/pcma", vec![0xD5; 160]),
            ("image/png", png(640, 480)),
            ("image/jpeg", jpeg(640, 480)),
            ("image/jpeg", jpeg_after(10_000, 640, 480)),
            ("image/gif", gif(640, 480)),
            ("image/gif", b"GIF87a\x80\x02\xe0\x01\x00\x00\x00;".to_vec()),
            ("image/webp", webp()),
            (TEXT_PLAIN, "olá, agent 7 here — 👋".as_bytes().to_vec()),
            (TEXT_PLAIN, "\u{feff}bom first".as_bytes().to_vec()),
            (TEXT_PLAIN, Vec::new()),
            (JSON, br#"{"messages":[{"from":"customer","text":"hi"}]}"#.to_vec()),
            (JSON, "\u{feff} [\"bom\", \"and space\"] \n".as_bytes().to_vec()),
            (JSON, b"42".to_vec()),
        ]
    }

    #[test]
    fn every_accepted_type_passes_whole_and_bytewise() {
        let mut covered = std::collections::BTreeSet::new();
        for (t, data) in positive_cases() {
            check(t, &data).unwrap_or_else(|e| panic!("{t}: {e}"));
            check_bytewise(t, &data).unwrap_or_else(|e| panic!("{t} bytewise: {e}"));
            covered.insert(t);
        }
        for kind in ContentKind::ALL {
            for t in accepted(kind) {
                assert!(covered.contains(t), "no positive case for {t}");
            }
        }
    }

    #[test]
    fn canonical_types_and_every_alias_normalise() {
        use ContentKind::*;
        for kind in ContentKind::ALL {
            for t in accepted(kind) {
                assert_eq!(normalise_content_type(kind, t).unwrap(), *t);
                assert_eq!(normalise_content_type(kind, &t.to_ascii_uppercase()).unwrap(), *t);
            }
        }
        let cases = [
            (CallRecording, "audio/x-wav", "audio/wav"),
            (CallRecording, "Audio/X-WAV", "audio/wav"),
            (CallRecording, "audio/wave", "audio/wav"),
            (CallRecording, "audio/vnd.wave", "audio/wav"),
            (CallRecording, "audio/mp3", "audio/mpeg"),
            (CallRecording, "audio/x-flac", "audio/flac"),
            (CallRecording, "audio/PCMU", "audio/pcmu"),
            (CallRecording, "audio/PCMA", "audio/pcma"),
            (CallRecording, " audio/pcmu ; rate=8000 ", "audio/pcmu"),
            (CallRecording, "audio/ogg; codecs=opus", "audio/ogg"),
            (Image, "image/jpg", "image/jpeg"),
            (Image, "image/pjpeg", "image/jpeg"),
            (Image, "IMAGE/PNG", "image/png"),
            (ChatTranscript, "text/plain", TEXT_PLAIN),
            (ChatTranscript, "text/plain;charset=utf-8", TEXT_PLAIN),
            (ChatTranscript, "TEXT/PLAIN; Charset=\"UTF-8\"", TEXT_PLAIN),
            (ChatTranscript, "text/plain; charset=UTF8", TEXT_PLAIN),
            (ChatTranscript, "application/json", JSON),
            (ChatTranscript, "application/json; charset=utf8", JSON),
            (ChatTranscript, "Application/JSON; CHARSET=UTF-8", JSON),
        ];
        for (kind, declared, want) in cases {
            assert_eq!(normalise_content_type(kind, declared).unwrap(), want, "{declared}");
        }
    }

    #[test]
    fn refused_types_explain_what_is_accepted() {
        use ContentKind::*;
        for charset in ["latin1", "ISO-8859-1", "utf-16"] {
            for t in ["text/plain", "application/json"] {
                let e = normalise_content_type(ChatTranscript, &format!("{t}; charset={charset}")).unwrap_err();
                assert!(e.0.contains("transcripts must be UTF-8"), "{e}");
            }
        }
        let e = normalise_content_type(Image, "audio/wav").unwrap_err();
        assert!(e.0.contains("image:") && e.0.contains("image/png, image/jpeg, image/webp, image/gif"), "{e}");
        let e = normalise_content_type(CallRecording, "video/mp4").unwrap_err();
        assert!(e.0.contains("call-recording") && e.0.contains("audio/pcma"), "{e}");
        let e = normalise_content_type(ChatTranscript, "text/html; charset=latin1").unwrap_err();
        assert!(e.0.contains("chat-transcript") && e.0.contains(TEXT_PLAIN), "{e}");
        assert!(normalise_content_type(Image, "text/plain").is_err());
        assert!(normalise_content_type(CallRecording, "image/png").is_err());
        for empty in ["", " ", "; charset=utf-8"] {
            let e = normalise_content_type(CallRecording, empty).unwrap_err();
            assert!(e.0.contains("required") && e.0.contains("audio/wav"), "{empty:?}: {e}");
        }
    }

    #[test]
    fn g4_png_declared_as_wav_is_rejected() {
        let e = check("audio/wav", &png(10, 10)).unwrap_err();
        assert_eq!(e.0, "declared audio/wav but the content looks like image/png");
    }

    #[test]
    fn g4_mismatches_name_the_declared_and_the_seen_type() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("image/png", jpeg(10, 10), "image/jpeg"),
            ("image/jpeg", png(10, 10), "image/png"),
            ("image/webp", wav(), "audio/wav"),
            ("audio/wav", webp(), "image/webp"),
            ("audio/flac", wav(), "audio/wav"),
            ("audio/mpeg", png(10, 10), "image/png"),
            ("audio/mpeg", jpeg(10, 10), "image/jpeg"),
            ("audio/ogg", b"fLaC\x00\x00\x00\x22".to_vec(), "audio/flac"),
            ("image/gif", ogg_opus(), "audio/opus"),
            ("image/png", b"hello, this is a transcript".to_vec(), TEXT_PLAIN),
            ("audio/opus", br#"{"messages": []}"#.to_vec(), JSON),
        ];
        for (declared, data, seen) in cases {
            let e = check(declared, &data).unwrap_err();
            assert!(e.0.contains(&format!("declared {declared}")) && e.0.contains(seen), "{declared}: {e}");
            let e = check_bytewise(declared, &data).unwrap_err();
            assert!(e.0.contains(&format!("declared {declared}")), "{declared} bytewise: {e}");
        }
        let e = check("image/gif", b"GIF90a\x01\x00\x01\x00").unwrap_err();
        assert!(e.0.contains("declared image/gif") && e.0.contains("GIF89a"), "{e}");
        let e = check("audio/wav", &[0u8; 40]).unwrap_err();
        assert!(e.0.contains("RIFF/WAVE"), "{e}");
    }

    #[test]
    fn g4_mismatch_fails_the_update_that_completes_the_magic() {
        let data = png(10, 10);
        let mut c = ContentChecker::new("audio/wav", SniffLimits::default());
        c.update(&data[..11]).unwrap();
        assert!(c.update(&data[11..12]).is_err(), "12 bytes decide a RIFF header");
        assert!(c.update(b"more").is_err(), "stays refused");
        assert!(c.finish().is_err());

        let mut c = ContentChecker::new("image/png", SniffLimits::default());
        c.update(&jpeg(1, 1)[..7]).unwrap();
        assert!(c.update(&[0]).is_err(), "8 bytes decide a PNG signature");
    }

    #[test]
    fn g4_too_short_for_the_magic_is_rejected() {
        for (t, data) in [("audio/wav", &b"RIFF\0\0"[..]), ("image/png", b"\x89PNG"), ("audio/flac", b"fL")] {
            let e = check(t, data).unwrap_err();
            assert!(e.0.contains("too short"), "{t}: {e}");
        }
    }

    #[test]
    fn audio_is_not_buffered_after_its_head() {
        let mut c = ContentChecker::new("audio/wav", SniffLimits::default());
        c.update(&wav()[..20]).unwrap();
        assert!(matches!(c.stage, Stage::Done));
        c.update(&vec![0xAB; 1 << 20]).unwrap();
        assert!(matches!(c.stage, Stage::Done));
        c.finish().unwrap();
        for t in ["audio/basic", "audio/pcmu", "audio/pcma"] {
            let mut c = ContentChecker::new(t, SniffLimits::default());
            c.update(&[0xFF]).unwrap();
            assert!(matches!(c.stage, Stage::Done), "{t}");
        }
    }

    #[test]
    fn g4_binary_declared_as_text_is_rejected() {
        let e = check(TEXT_PLAIN, b"hello\0world").unwrap_err();
        assert_eq!(e.0, "transcripts must be text: found a NUL byte at offset 5");
        let e = check(JSON, b"{\"a\":\0}").unwrap_err();
        assert!(e.0.contains("NUL byte at offset 5"), "{e}");
        let e = check(TEXT_PLAIN, b"abc\xFFdef").unwrap_err();
        assert!(e.0.contains("UTF-8") && e.0.contains("offset 3"), "{e}");
        let e = check(TEXT_PLAIN, &png(10, 10)).unwrap_err();
        assert!(e.0.contains("offset 0"), "{e}");
        // The earlier of an invalid byte and a NUL is named.
        let e = check(TEXT_PLAIN, b"ab\xC0\x80\0").unwrap_err();
        assert!(e.0.contains("UTF-8") && e.0.contains("offset 2"), "{e}");
        // Offsets count the bytes of earlier chunks.
        let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
        c.update("héllo ".as_bytes()).unwrap();
        let e = c.update(b"wor\0ld").unwrap_err();
        assert!(e.0.contains("offset 10"), "{e}");
        // A character split, then completed with a bad continuation byte.
        let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
        c.update(b"ab\xE2").unwrap();
        let e = c.update(b"\x82A").unwrap_err();
        assert!(e.0.contains("offset 2"), "{e}");
        // Ends inside a character.
        let e = check(TEXT_PLAIN, &"café".as_bytes()[..4]).unwrap_err();
        assert!(e.0.contains("ends inside a character at offset 3"), "{e}");
        assert!(check(JSON, &"\"café\"".as_bytes()[..5]).is_err());
    }

    #[test]
    fn json_must_parse() {
        for bad in [&b"{\"a\": "[..], b"not json", b"{\"a\":1} trailing", b"   ", b"[1,]", b"\xEF\xBB\xBF"] {
            let e = check(JSON, bad).unwrap_err();
            assert!(e.0.contains("not JSON"), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        let e = check(JSON, b"{\"a\": \"\xFF\"}").unwrap_err();
        assert!(e.0.contains("UTF-8") && e.0.contains("offset 7"), "{e}");
        let mut c = ContentChecker::new(JSON, SniffLimits::default());
        assert!(c.update(b"[\"\xFF").is_err(), "invalid UTF-8 fails before finish");
        let deep = "[".repeat(10_000);
        assert!(check(JSON, deep.as_bytes()).is_err(), "deep nesting is an error, not a stack overflow");
    }

    #[test]
    fn g5_json_buffer_is_capped_at_16_mib() {
        let mut c = ContentChecker::new(JSON, SniffLimits::default());
        c.update(b"[").unwrap();
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..15 {
            c.update(&chunk).unwrap();
        }
        let e = c.update(&chunk).unwrap_err();
        assert!(e.0.contains("16 MiB"), "{e}");
    }

    #[test]
    fn g5_image_dimensions_over_the_cap_are_rejected() {
        let e = check("image/png", &png(100_000, 10)).unwrap_err();
        assert!(e.0.contains("100000x10") && e.0.contains("16384x16384"), "{e}");
        let e = check("image/png", &png(10, 16385)).unwrap_err();
        assert!(e.0.contains("10x16385"), "{e}");
        let e = check("image/png", &png(16384, 16384)).unwrap_err();
        assert!(e.0.contains("100000000 pixels"), "over the pixel cap: {e}");
        assert!(check("image/png", &png(10_000, 10_000)).is_ok(), "exactly the pixel cap");
        assert!(check("image/png", &png(u32::MAX, u32::MAX)).is_err());
        assert!(check("image/jpeg", &jpeg(20_000, 10)).is_err());
        assert!(check("image/gif", &gif(65535, 65535)).is_err());
        assert!(check("image/jpeg", &jpeg(0, 10)).is_err());
        let small = SniffLimits { max_image_width: 100, max_image_height: 100, max_image_pixels: 5000 };
        let mut c = ContentChecker::new("image/png", small);
        let e = c.update(&png(80, 80)).unwrap_err();
        assert!(e.0.contains("80x80") && e.0.contains("100x100") && e.0.contains("5000"), "{e}");
    }

    #[test]
    fn g5_dimensions_fail_the_update_that_completes_the_header() {
        let data = png(100_000, 10);
        let mut c = ContentChecker::new("image/png", SniffLimits::default());
        c.update(&data[..23]).unwrap();
        assert!(c.update(&data[23..24]).is_err());
    }

    #[test]
    fn g5_image_header_must_appear_within_64_kib() {
        assert!(check("image/jpeg", &jpeg_after(60_000, 640, 480)).is_ok());
        let e = check("image/jpeg", &jpeg_after(70_000, 640, 480)).unwrap_err();
        assert!(e.0.contains("65536") && e.0.contains("dimensions"), "{e}");
        let e = check("image/png", &png(10, 10)[..20]).unwrap_err();
        assert!(e.0.contains("dimensions could not be read"), "truncated before its size: {e}");
        let e = check("image/jpeg", &jpeg_after(1000, 10, 10)[..500]).unwrap_err();
        assert!(e.0.contains("truncated"), "{e}");
    }

    #[test]
    fn g3_empty_content_only_for_plain_text() {
        assert!(check(TEXT_PLAIN, b"").is_ok());
        assert!(ContentChecker::new(TEXT_PLAIN, SniffLimits::default()).finish().is_ok());
        for kind in ContentKind::ALL {
            for t in accepted(kind).iter().filter(|t| **t != TEXT_PLAIN) {
                let e = check(t, b"").unwrap_err();
                assert!(e.0.contains("empty"), "{t}: {e}");
                let e = ContentChecker::new(t, SniffLimits::default()).finish().unwrap_err();
                assert!(e.0.contains("empty"), "{t} without update: {e}");
            }
        }
    }

    #[test]
    fn unnormalised_types_are_never_vouched_for() {
        for t in ["application/octet-stream", "audio/x-wav", "text/plain", ""] {
            assert!(check(t, b"anything").is_err(), "{t}");
            assert!(ContentChecker::new(t, SniffLimits::default()).finish().is_err(), "{t}");
        }
    }

    #[test]
    fn debug_does_not_print_content() {
        let mut c = ContentChecker::new(JSON, SniffLimits::default());
        c.update(br#"{"text":"my card number is"}"#).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("card") && d.contains("json"), "{d}");
    }

    #[test]
    fn guesses_stay_within_the_kind() {
        use ContentKind::*;
        for (t, data) in positive_cases() {
            // Headerless audio cannot be guessed, nor a bare JSON scalar.
            if matches!(t, "audio/basic" | "audio/pcmu" | "audio/pcma") || data.is_empty() || data == b"42" {
                continue;
            }
            let kind = ContentKind::ALL.into_iter().find(|k| accepted(*k).contains(&t)).unwrap();
            let guess = guess_content_type(kind, &data);
            let ok = guess == Some(t) || (t == "audio/ogg" && guess == Some("audio/opus"));
            assert!(ok, "{t}: guessed {guess:?}");
        }
        assert_eq!(guess_content_type(CallRecording, b".snd\x00\x00\x00\x18"), Some("audio/basic"));
        assert_eq!(guess_content_type(Image, &wav()), None);
        assert_eq!(guess_content_type(CallRecording, &[0xFF; 64]), None, "μ-law silence is not MPEG");
        assert_eq!(guess_content_type(ChatTranscript, b"hello"), Some(TEXT_PLAIN));
        assert_eq!(guess_content_type(ChatTranscript, b"42"), Some(TEXT_PLAIN), "only objects and arrays are JSON");
        assert_eq!(guess_content_type(ChatTranscript, b"[10:02] agent: hello"), Some(TEXT_PLAIN));
        assert_eq!(guess_content_type(ChatTranscript, b"  {\"a\":1}"), Some(JSON));
        assert_eq!(guess_content_type(ChatTranscript, b"{\"messages\": [{\"text\": \"cut"), Some(JSON));
        assert_eq!(guess_content_type(ChatTranscript, &"olá".as_bytes()[..3]), Some(TEXT_PLAIN), "cut in a char");
        assert_eq!(guess_content_type(ChatTranscript, b"bin\0ary"), None);
        assert_eq!(guess_content_type(ChatTranscript, b""), None);
    }

    /// Two-, three- and four-byte characters between ASCII.
    const MIXED: &str = "a é € 𝄞 ü\u{feff}z";

    #[test]
    fn utf8_split_at_every_point_is_accepted() {
        let bytes = MIXED.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
                for part in [&bytes[..i], &bytes[i..j], &bytes[j..]] {
                    c.update(part).unwrap_or_else(|e| panic!("split {i},{j}: {e}"));
                }
                c.finish().unwrap_or_else(|e| panic!("split {i},{j}: {e}"));
            }
        }
        assert!(check_bytewise(TEXT_PLAIN, bytes).is_ok());
        let json = serde_json::to_vec(MIXED).unwrap();
        for i in 0..=json.len() {
            let mut c = ContentChecker::new(JSON, SniffLimits::default());
            c.update(&json[..i]).unwrap();
            c.update(&json[i..]).unwrap();
            c.finish().unwrap_or_else(|e| panic!("json split {i}: {e}"));
        }
    }

    #[test]
    fn an_invalid_byte_at_every_point_is_rejected_at_its_offset() {
        let bytes = MIXED.as_bytes();
        for at in 0..=bytes.len() {
            let mut bad = bytes.to_vec();
            bad.insert(at, 0xFF);
            // The offset named is that of the character the 0xFF breaks.
            let start = (0..=at).rev().find(|&k| MIXED.is_char_boundary(k)).unwrap();
            for cut in 0..=bad.len() {
                let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
                let e = c.update(&bad[..cut]).and_then(|_| c.update(&bad[cut..])).unwrap_err();
                assert!(e.0.contains(&format!("offset {start}")), "0xFF at {at}, cut {cut}: {e}");
            }
        }
    }

    proptest! {
        #[test]
        fn utf8_split_anywhere_is_accepted(s in "\\PC{0,64}", cuts in proptest::collection::vec(0usize..256, 0..6)) {
            let bytes = s.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            for t in [TEXT_PLAIN, JSON] {
                let body = if t == JSON { serde_json::to_vec(&s).unwrap() } else { bytes.to_vec() };
                let mut c = ContentChecker::new(t, SniffLimits::default());
                let mut last = 0;
                for p in points.iter().map(|p| p * body.len() / bytes.len().max(1)).chain([body.len()]) {
                    c.update(&body[last..p]).unwrap();
                    last = p;
                }
                c.finish().unwrap();
            }
        }

        #[test]
        fn an_invalid_byte_anywhere_is_rejected(s in "\\PC{0,40}", at in 0usize..256, cut in 0usize..256) {
            let mut bytes = s.as_bytes().to_vec();
            let at = at % (bytes.len() + 1);
            bytes.insert(at, 0xFF);
            let cut = cut % (bytes.len() + 1);
            for t in [TEXT_PLAIN, JSON] {
                let mut c = ContentChecker::new(t, SniffLimits::default());
                let r = c.update(&bytes[..cut]).and_then(|_| c.update(&bytes[cut..]));
                prop_assert!(r.is_err(), "{} accepted 0xFF at {}", t, at);
            }
        }
    }
}
