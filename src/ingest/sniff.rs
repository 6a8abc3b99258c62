//! Content checks: the declared MIME type is canonicalised per kind, and the
//! bytes must look like it (magic numbers, image dimensions, UTF-8 text,
//! JSON). Checks run as bytes arrive, so a mismatch fails the upload before
//! any more of it is stored.

use crate::model::{ContentKind, InvalidInput};

/// Caps on decoded image size (decompression bombs, G5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SniffLimits {
    pub max_image_width: u32,
    pub max_image_height: u32,
    pub max_image_pixels: u64,
}

impl Default for SniffLimits {
    fn default() -> Self {
        Self { max_image_width: 16384, max_image_height: 16384, max_image_pixels: 100_000_000 }
    }
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// JSON transcripts are parsed whole at finish; this bounds the buffer.
const MAX_JSON: usize = 16 << 20;
/// Bytes of an image's head buffered to find its dimensions.
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

/// Canonicalises a declared MIME type for a kind, or explains what is
/// accepted.
pub fn normalise_content_type(kind: ContentKind, declared: &str) -> Result<String, InvalidInput> {
    let lower = declared.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return Err(InvalidInput(format!(
            "content_type is required for {}: one of {}",
            kind.name(),
            accepted(kind).join(", ")
        )));
    }
    let mut parts = lower.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    let mut charset = None;
    for p in parts.filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some(("charset", v)) => charset = Some(v.trim_matches('"').to_owned()),
            _ => {
                return Err(InvalidInput(format!("content_type {declared:?}: unsupported parameter {p:?}")));
            }
        }
    }
    let canonical = match essence {
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" | "audio/wav" => "audio/wav",
        "audio/mp3" | "audio/mpeg" => "audio/mpeg",
        "audio/x-flac" | "audio/flac" => "audio/flac",
        "image/jpg" | "image/pjpeg" | "image/jpeg" => "image/jpeg",
        "text/plain" => TEXT_PLAIN,
        other => other,
    };
    if let Some(cs) = &charset {
        let is_text = canonical == TEXT_PLAIN || canonical == JSON;
        if !is_text {
            return Err(InvalidInput(format!("content_type {declared:?}: a charset applies only to transcripts")));
        }
        if cs != "utf-8" && cs != "utf8" {
            return Err(InvalidInput(format!("transcripts must be UTF-8; charset {cs:?} is not accepted")));
        }
    }
    if accepted(kind).contains(&canonical) {
        Ok(canonical.to_owned())
    } else {
        Err(InvalidInput(format!(
            "content_type {declared:?} is not accepted for {}: use one of {}",
            kind.name(),
            accepted(kind).join(", ")
        )))
    }
}

/// Best guess of a type from the first bytes, among the types of `kind`.
pub fn guess_content_type(kind: ContentKind, head: &[u8]) -> Option<&'static str> {
    let guess = guess_any(head)?;
    accepted(kind).contains(&guess).then_some(guess)
}

fn guess_any(h: &[u8]) -> Option<&'static str> {
    if h.len() >= 12 && &h[..4] == b"RIFF" && &h[8..12] == b"WAVE" {
        Some("audio/wav")
    } else if h.len() >= 12 && &h[..4] == b"RIFF" && &h[8..12] == b"WEBP" {
        Some("image/webp")
    } else if h.starts_with(b"OggS") {
        if h.windows(8).take(64).any(|w| w == b"OpusHead") { Some("audio/opus") } else { Some("audio/ogg") }
    } else if h.starts_with(b"fLaC") {
        Some("audio/flac")
    } else if h.starts_with(b"ID3") || (h.len() >= 2 && h[0] == 0xFF && h[1] & 0xE0 == 0xE0 && h[1] != 0xFF) {
        Some("audio/mpeg")
    } else if h.starts_with(b".snd") {
        Some("audio/basic")
    } else if h.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if h.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if h.starts_with(b"GIF87a") || h.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if h.starts_with(b"{") || h.starts_with(b"[") || h.starts_with(b"\xEF\xBB\xBF{") {
        Some(JSON)
    } else if !h.is_empty() && std::str::from_utf8(h).is_ok() && !h.contains(&0) {
        Some(TEXT_PLAIN)
    } else {
        None
    }
}

/// How many head bytes a type's magic check needs.
fn magic_len(t: &str) -> usize {
    match t {
        "audio/wav" | "image/webp" => 12,
        "image/png" => 8,
        "image/gif" => 6,
        "audio/ogg" | "audio/opus" | "audio/flac" => 4,
        "audio/mpeg" | "image/jpeg" => 3,
        _ => 0,
    }
}

fn magic_ok(t: &str, h: &[u8]) -> bool {
    match t {
        "audio/wav" => &h[..4] == b"RIFF" && &h[8..12] == b"WAVE",
        "image/webp" => &h[..4] == b"RIFF" && &h[8..12] == b"WEBP",
        "audio/ogg" | "audio/opus" => h.starts_with(b"OggS"),
        "audio/flac" => h.starts_with(b"fLaC"),
        "audio/mpeg" => h.starts_with(b"ID3") || (h[0] == 0xFF && h[1] & 0xE0 == 0xE0),
        "image/png" => h.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => h.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => h.starts_with(b"GIF87a") || h.starts_with(b"GIF89a"),
        _ => true,
    }
}

#[derive(Debug)]
enum Stage {
    /// Buffering the head until the magic (and image size) can be checked.
    Head(Vec<u8>),
    /// Audio after its head: nothing more to check.
    Done,
    /// Text: streaming UTF-8 validation with carried partial characters.
    Text {
        carry: Vec<u8>,
    },
    /// JSON: UTF-8 as text, and the whole body for a parse at finish.
    Json {
        body: Vec<u8>,
    },
    Failed,
}

/// Checks one upload's bytes against its (normalised) content type.
#[derive(Debug)]
pub struct ContentChecker {
    content_type: String,
    limits: SniffLimits,
    stage: Stage,
    seen: u64,
}

impl ContentChecker {
    pub fn new(content_type: &str, limits: SniffLimits) -> Self {
        let stage = match content_type {
            TEXT_PLAIN => Stage::Text { carry: Vec::new() },
            JSON => Stage::Json { body: Vec::new() },
            _ => Stage::Head(Vec::new()),
        };
        Self { content_type: content_type.to_owned(), limits, stage, seen: 0 }
    }

    fn is_image(&self) -> bool {
        self.content_type.starts_with("image/")
    }

    fn mismatch(&self, head: &[u8]) -> InvalidInput {
        let looks =
            guess_any(head).map(|g| format!("looks like {g}")).unwrap_or_else(|| "matches no known type".into());
        InvalidInput(format!("declared {} but the content {looks}", self.content_type))
    }

    /// Checks more bytes; fails as soon as the content cannot match.
    pub fn update(&mut self, data: &[u8]) -> Result<(), InvalidInput> {
        let r = self.update_inner(data);
        if r.is_err() {
            self.stage = Stage::Failed;
        }
        self.seen += data.len() as u64;
        r
    }

    fn update_inner(&mut self, data: &[u8]) -> Result<(), InvalidInput> {
        let offset = self.seen;
        let is_image = self.is_image();
        match &mut self.stage {
            Stage::Failed => Err(InvalidInput("content already refused".into())),
            Stage::Done => Ok(()),
            Stage::Text { carry } => check_utf8(carry, data, offset),
            Stage::Json { body } => {
                if body.len() + data.len() > MAX_JSON {
                    return Err(InvalidInput(format!("JSON transcripts are limited to {MAX_JSON} bytes")));
                }
                let before = body.len();
                body.extend_from_slice(data);
                check_text_chunk(&body[before..], offset)
            }
            Stage::Head(head) => {
                let need = magic_len(&self.content_type);
                let take = if is_image { MAX_IMAGE_HEAD } else { need };
                let room = take.saturating_sub(head.len()).min(data.len());
                head.extend_from_slice(&data[..room]);
                if head.len() < need {
                    return Ok(());
                }
                let head = std::mem::take(head);
                if !magic_ok(&self.content_type, &head) {
                    return Err(self.mismatch(&head));
                }
                if !self.is_image() {
                    self.stage = Stage::Done;
                    return Ok(());
                }
                match imagesize::blob_size(&head) {
                    Ok(size) => {
                        self.check_dims(size.width as u64, size.height as u64)?;
                        self.stage = Stage::Done;
                        Ok(())
                    }
                    Err(_) if head.len() < MAX_IMAGE_HEAD => {
                        self.stage = Stage::Head(head);
                        Ok(())
                    }
                    Err(_) => Err(InvalidInput(format!(
                        "declared {} but its dimensions are not in the first {MAX_IMAGE_HEAD} bytes; the image looks malformed",
                        self.content_type
                    ))),
                }
            }
        }
    }

    fn check_dims(&self, w: u64, h: u64) -> Result<(), InvalidInput> {
        let l = &self.limits;
        if w == 0 || h == 0 {
            return Err(InvalidInput(format!("image has no pixels ({w}x{h})")));
        }
        if w > u64::from(l.max_image_width) || h > u64::from(l.max_image_height) || w * h > l.max_image_pixels {
            return Err(InvalidInput(format!(
                "image is {w}x{h} pixels; the cap is {}x{} and {} pixels in all",
                l.max_image_width, l.max_image_height, l.max_image_pixels
            )));
        }
        Ok(())
    }

    /// Final checks once every byte has been seen.
    pub fn finish(self) -> Result<(), InvalidInput> {
        let empty = || InvalidInput(format!("the content is empty; {} cannot be empty", self.content_type));
        if self.seen == 0 && self.content_type != TEXT_PLAIN {
            return Err(empty());
        }
        match self.stage {
            Stage::Failed => Err(InvalidInput("content already refused".into())),
            Stage::Done => Ok(()),
            Stage::Head(ref head) => {
                if self.seen == 0 {
                    return Err(empty());
                }
                let need = magic_len(&self.content_type);
                if head.len() < need {
                    return Err(InvalidInput(format!(
                        "declared {} but the content is only {} bytes, too short to be one",
                        self.content_type, self.seen
                    )));
                }
                // An image whose dimensions never appeared.
                if self.is_image() {
                    return Err(InvalidInput(format!(
                        "declared {} but its dimensions could not be read; the image looks truncated",
                        self.content_type
                    )));
                }
                Ok(())
            }
            Stage::Text { ref carry } => {
                if carry.is_empty() {
                    Ok(())
                } else {
                    Err(InvalidInput(format!(
                        "transcripts must be UTF-8: the content ends inside a character at byte {}",
                        self.seen - carry.len() as u64
                    )))
                }
            }
            Stage::Json { ref body } => {
                if body.is_empty() {
                    return Err(empty());
                }
                let text = std::str::from_utf8(body).map_err(|e| {
                    InvalidInput(format!("transcripts must be UTF-8: invalid byte at offset {}", e.valid_up_to()))
                })?;
                let text = text.strip_prefix('\u{feff}').unwrap_or(text);
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .map(|_| ())
                    .map_err(|e| InvalidInput(format!("declared application/json but the content is not JSON: {e}")))
            }
        }
    }
}

/// Rejects NUL bytes (binary content declared as text).
fn check_text_chunk(data: &[u8], offset: u64) -> Result<(), InvalidInput> {
    if let Some(i) = data.iter().position(|&b| b == 0) {
        return Err(InvalidInput(format!(
            "transcripts must be text: found a NUL byte at offset {}",
            offset + i as u64
        )));
    }
    Ok(())
}

/// Streaming UTF-8 check; `carry` holds an incomplete trailing character.
fn check_utf8(carry: &mut Vec<u8>, data: &[u8], offset: u64) -> Result<(), InvalidInput> {
    check_text_chunk(data, offset)?;
    let start = offset - carry.len() as u64;
    let mut buf = std::mem::take(carry);
    buf.extend_from_slice(data);
    match std::str::from_utf8(&buf) {
        Ok(_) => Ok(()),
        Err(e) if e.error_len().is_none() => {
            // Incomplete character at the end: wait for more bytes.
            *carry = buf[e.valid_up_to()..].to_vec();
            Ok(())
        }
        Err(e) => Err(InvalidInput(format!(
            "transcripts must be UTF-8: invalid byte at offset {}",
            start + e.valid_up_to() as u64
        ))),
    }
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

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0];
        v.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
        v
    }

    fn wav() -> Vec<u8> {
        let mut v = b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec();
        v.extend_from_slice(&[0; 32]);
        v
    }

    #[test]
    fn aliases_are_canonicalised_and_unknown_types_listed() {
        let k = ContentKind::CallRecording;
        assert_eq!(normalise_content_type(k, "Audio/X-WAV").unwrap(), "audio/wav");
        assert_eq!(normalise_content_type(k, "audio/mp3").unwrap(), "audio/mpeg");
        assert_eq!(normalise_content_type(k, "audio/PCMU").unwrap(), "audio/pcmu");
        let i = ContentKind::Image;
        assert_eq!(normalise_content_type(i, "image/jpg").unwrap(), "image/jpeg");
        let t = ContentKind::ChatTranscript;
        assert_eq!(normalise_content_type(t, "text/plain").unwrap(), TEXT_PLAIN);
        assert_eq!(normalise_content_type(t, "TEXT/PLAIN; Charset=\"UTF-8\"").unwrap(), TEXT_PLAIN);
        assert_eq!(normalise_content_type(t, "application/json; charset=utf8").unwrap(), JSON);
        let e = normalise_content_type(t, "text/plain; charset=latin1").unwrap_err();
        assert!(e.0.contains("UTF-8"), "{e}");
        let e = normalise_content_type(i, "audio/wav").unwrap_err();
        assert!(e.0.contains("image/png") && e.0.contains("image"), "{e}");
        assert!(normalise_content_type(k, " ").is_err());
    }

    #[test]
    fn every_accepted_type_passes_with_its_magic() {
        let ogg = b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00OpusHead".to_vec();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("audio/wav", wav()),
            ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00".to_vec()),
            ("audio/mpeg", vec![0xFF, 0xFB, 0x90, 0x00]),
            ("audio/ogg", ogg.clone()),
            ("audio/opus", ogg),
            ("audio/flac", b"fLaC\x00\x00\x00\x22".to_vec()),
            ("audio/basic", vec![0xFF, 0x7F, 0x00]),
            ("audio/pcmu", vec![0x13; 160]),
            ("audio/pcma", vec![0xD5; 160]),
            ("image/png", png(640, 480)),
            ("image/jpeg", jpeg(640, 480)),
            ("image/gif", b"GIF89a\x80\x02\xe0\x01\x00\x00\x00;".to_vec()),
            (
                "image/webp",
                b"RIFF\x1a\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00\x7f\x02\x00\xdf\x01\x00\x00\x00"
                    .to_vec(),
            ),
            (TEXT_PLAIN, "olá, agent 7 here".as_bytes().to_vec()),
            (JSON, br#"{"messages":[{"from":"customer","text":"hi"}]}"#.to_vec()),
        ];
        for (t, data) in cases {
            check(t, &data).unwrap_or_else(|e| panic!("{t}: {e}"));
            // Byte by byte too: the checker buffers what it needs.
            let mut c = ContentChecker::new(t, SniffLimits::default());
            for b in &data {
                c.update(std::slice::from_ref(b)).unwrap_or_else(|e| panic!("{t} bytewise: {e}"));
            }
            c.finish().unwrap_or_else(|e| panic!("{t} bytewise finish: {e}"));
        }
    }

    #[test]
    fn g4_png_declared_as_wav_is_rejected_naming_both() {
        let e = check("audio/wav", &png(10, 10)).unwrap_err();
        assert!(e.0.contains("declared audio/wav") && e.0.contains("image/png"), "{e}");
        let e = check("image/png", &jpeg(10, 10)).unwrap_err();
        assert!(e.0.contains("image/jpeg"), "{e}");
        assert!(check("audio/flac", &wav()).is_err());
        assert!(check("image/gif", b"GIF90a......").is_err());
    }

    #[test]
    fn g4_binary_declared_as_text_is_rejected() {
        let e = check(TEXT_PLAIN, b"hello\0world").unwrap_err();
        assert!(e.0.contains("NUL byte at offset 5"), "{e}");
        let e = check(TEXT_PLAIN, b"abc\xFFdef").unwrap_err();
        assert!(e.0.contains("offset 3"), "{e}");
        assert!(check(JSON, b"{\"a\": ").is_err());
        assert!(check(JSON, b"not json").is_err());
        assert!(check(TEXT_PLAIN, "caf\u{e9}".as_bytes()).is_ok());
        assert!(check(TEXT_PLAIN, &"café".as_bytes()[..4]).is_err(), "ends inside a character");
    }

    #[test]
    fn g5_image_dimensions_over_the_cap_are_rejected() {
        let e = check("image/png", &png(100_000, 10)).unwrap_err();
        assert!(e.0.contains("100000x10"), "{e}");
        assert!(check("image/png", &png(16384, 16384)).is_err(), "over the pixel cap");
        assert!(check("image/png", &png(10_000, 10_000)).is_ok());
        assert!(check("image/jpeg", &jpeg(0, 10)).is_err());
        assert!(check("image/png", &png(10, 10)[..20]).is_err(), "truncated before its size");
    }

    #[test]
    fn g3_empty_content_only_for_plain_text() {
        assert!(check(TEXT_PLAIN, b"").is_ok());
        for t in ["audio/wav", "audio/pcmu", "image/png", JSON] {
            let e = check(t, b"").unwrap_err();
            assert!(e.0.contains("empty"), "{t}: {e}");
        }
    }

    #[test]
    fn guesses_stay_within_the_kind() {
        assert_eq!(guess_content_type(ContentKind::CallRecording, &wav()), Some("audio/wav"));
        assert_eq!(guess_content_type(ContentKind::Image, &wav()), None);
        assert_eq!(guess_content_type(ContentKind::ChatTranscript, b"hello"), Some(TEXT_PLAIN));
        assert_eq!(guess_content_type(ContentKind::ChatTranscript, b"{\"a\":1}"), Some(JSON));
    }

    proptest! {
        #[test]
        fn utf8_split_anywhere_is_accepted(s in "\\PC{0,64}", cuts in proptest::collection::vec(0usize..256, 0..6)) {
            let bytes = s.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                c.update(&bytes[last..p]).unwrap();
                last = p;
            }
            c.finish().unwrap();
        }

        #[test]
        fn an_invalid_byte_anywhere_is_rejected(s in "[a-zé€ ]{0,40}", at in 0usize..64, cut in 0usize..64) {
            let mut bytes = s.as_bytes().to_vec();
            let at = at % (bytes.len() + 1);
            bytes.insert(at, 0xFF);
            let cut = cut % (bytes.len() + 1);
            let mut c = ContentChecker::new(TEXT_PLAIN, SniffLimits::default());
            let r = c.update(&bytes[..cut]).and_then(|_| c.update(&bytes[cut..]));
            prop_assert!(r.is_err() || c.finish().is_err());
        }
    }
}
