//! Silences marked-sensitive spans of call audio in any byte window of the plaintext, in place.
//!
//! Playback is served by byte range, so a span (in milliseconds) is mapped to
//! the bytes of the frames it touches and those bytes are overwritten with the
//! encoding's silence as each window passes by. Only formats whose samples sit
//! at a fixed byte position per frame can be silenced this way: linear PCM,
//! IEEE float, μ-law and A-law, raw or in WAV (and Sun `.snd` μ-law/A-law).
//! Compressed formats (MP3, Ogg/Opus, FLAC, ADPCM WAV) are refused with
//! [`Unsupported`], and the caller refuses coaching playback of the recording:
//! a span that cannot be silenced must never be heard (PCI DSS).

use std::fmt;
use std::ops::Range;

/// Most spans accepted on one recording; bounds the work per window.
pub const MAX_SPANS: usize = 1000;

/// WAV format tags (`wFormatTag`, or the first two bytes of the sub-format
/// GUID of `WAVE_FORMAT_EXTENSIBLE`).
const WAVE_FORMAT_PCM: u16 = 1;
const WAVE_FORMAT_IEEE_FLOAT: u16 = 3;
const WAVE_FORMAT_ALAW: u16 = 6;
const WAVE_FORMAT_MULAW: u16 = 7;
const WAVE_FORMAT_EXTENSIBLE: u16 = 0xFFFE;
/// The tail of every `KSDATAFORMAT_SUBTYPE_*` GUID
/// (`xxxxxxxx-0000-0010-8000-00aa00389b71`) as stored after its first four
/// bytes; any other GUID is a vendor format we cannot read.
const KSDATAFORMAT_TAIL: [u8; 12] = [0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71];

/// Sun `.snd` encodings we can silence.
const AU_MULAW: u32 = 1;
const AU_ALAW: u32 = 27;

/// Rate and channels of raw telephony audio (RFC 3551 PCMU/PCMA, `audio/basic`).
const TELEPHONY_RATE: u32 = 8000;

/// How silence is written: every variant's silence is one repeated byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Signed 16-bit little-endian PCM: 0x00.
    Pcm16Le,
    /// Unsigned 8-bit PCM (WAV's 8-bit format), centred on 0x80.
    Pcm8Unsigned,
    /// Signed 24-bit little-endian PCM: 0x00.
    Pcm24Le,
    /// Signed 32-bit little-endian PCM: 0x00.
    Pcm32Le,
    /// IEEE 754 single, little-endian: +0.0 is all zero bytes.
    Float32Le,
    /// IEEE 754 double, little-endian: +0.0 is all zero bytes.
    Float64Le,
    /// G.711 μ-law: 0xFF encodes the zero level (0x7F is "negative zero").
    MuLaw,
    /// G.711 A-law: 0xD5 is the code closest to zero (after the 0x55 XOR).
    ALaw,
}

impl Silence {
    /// The byte every sample byte is overwritten with.
    pub fn byte(self) -> u8 {
        match self {
            Silence::Pcm16Le | Silence::Pcm24Le | Silence::Pcm32Le | Silence::Float32Le | Silence::Float64Le => 0x00,
            Silence::Pcm8Unsigned => 0x80,
            Silence::MuLaw => 0xFF,
            Silence::ALaw => 0xD5,
        }
    }
}

/// Where the samples of a recording are, and how to silence them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLayout {
    /// Byte offset of the first sample in the object; bytes before it (the
    /// header) are never touched.
    pub data_offset: u64,
    /// Bytes of sample data, or `None` for "to the end of the object" (raw
    /// audio, or a streaming writer that left the size at 0 or 0xFFFFFFFF).
    pub data_len: Option<u64>,
    /// Bytes per frame: channels × bytes per sample (WAV's block align).
    pub frame_bytes: u32,
    /// Frames per second.
    pub sample_rate: u32,
    pub channels: u16,
    pub silence: Silence,
}

impl AudioLayout {
    /// Raw headerless G.711 at 8 kHz mono.
    fn telephony(silence: Silence) -> Self {
        Self { data_offset: 0, data_len: None, frame_bytes: 1, sample_rate: TELEPHONY_RATE, channels: 1, silence }
    }

    /// End of the sample data in an object of `object_size` bytes.
    pub fn data_end(&self, object_size: u64) -> u64 {
        let declared = self.data_len.map_or(u64::MAX, |len| self.data_offset.saturating_add(len));
        declared.min(object_size).max(self.data_offset.min(object_size))
    }

    /// Duration in whole milliseconds of the audio in an object of
    /// `object_size` bytes (a trailing partial frame is not counted).
    pub fn duration_ms(&self, object_size: u64) -> u64 {
        let bytes = self.data_end(object_size).saturating_sub(self.data_offset);
        let frames = bytes / u64::from(self.frame_bytes.max(1));
        let ms = u128::from(frames) * 1000 / u128::from(self.sample_rate.max(1));
        u64::try_from(ms).unwrap_or(u64::MAX)
    }
}

/// A sensitive span of a recording, in milliseconds from its start; half-open
/// (`end_ms` is not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// The recording's format cannot be silenced in place. The message is meant
/// for the client (the caller maps this to FAILED_PRECONDITION).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

fn refuse(what: &str, why: &str) -> Unsupported {
    Unsupported(format!(
        "sensitive spans of {what} cannot be silenced in place ({why}), so coaching playback of this recording is \
         refused"
    ))
}

/// Why compressed audio is refused: one message for all of them.
const COMPRESSED: &str = "compressed audio has no fixed byte position per millisecond; silencing it would need a \
                          re-encoded copy";

/// How to silence a recording of `content_type` whose object starts with
/// `head` (its first bytes, up to 64 KiB; the whole object if shorter).
///
/// Fails closed: anything not understood with certainty — a compressed or
/// unknown format, a malformed or truncated header, a type parameter naming
/// a rate or channel count we do not assume — is [`Unsupported`]. Never
/// panics, whatever `head` holds.
pub fn layout(content_type: &str, head: &[u8]) -> Result<AudioLayout, Unsupported> {
    let lower = content_type.trim().to_ascii_lowercase();
    let mut parts = lower.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default();
    let params: Vec<(&str, &str)> =
        parts.filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim(), v.trim().trim_matches('"'))).collect();
    match essence {
        "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => wav_layout(head),
        "audio/basic" if head.starts_with(b".snd") => au_layout(head),
        "audio/basic" | "audio/pcmu" => telephony(essence, &params, Silence::MuLaw),
        "audio/pcma" => telephony(essence, &params, Silence::ALaw),
        "audio/mpeg" | "audio/mp3" => Err(refuse("MP3 (audio/mpeg) recordings", COMPRESSED)),
        "audio/ogg" | "audio/opus" => Err(refuse("Ogg/Opus recordings", COMPRESSED)),
        "audio/flac" | "audio/x-flac" => Err(refuse("FLAC recordings", COMPRESSED)),
        "" => Err(refuse("a recording without a content type", "its format is unknown")),
        other => Err(refuse(&format!("{other} content"), "it is not an audio format that can be edited in place")),
    }
}

/// Raw G.711: 8 kHz mono by definition. A `rate` or `channels` parameter
/// saying otherwise is refused rather than guessed at: a wrong rate would
/// silence the wrong seconds.
fn telephony(essence: &str, params: &[(&str, &str)], silence: Silence) -> Result<AudioLayout, Unsupported> {
    for (name, value) in params {
        let fine = match *name {
            "rate" => value.parse::<u32>() == Ok(TELEPHONY_RATE),
            "channels" => value.parse::<u16>() == Ok(1),
            _ => true,
        };
        if !fine {
            return Err(refuse(
                &format!("{essence} recordings with {name}={value}"),
                "only raw 8000 Hz mono G.711 is supported",
            ));
        }
    }
    Ok(AudioLayout::telephony(silence))
}

fn u16_at(h: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(h.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(h: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(h.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u32_be_at(h: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(h.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The parts of a `fmt ` chunk that decide the layout.
struct WavFormat {
    channels: u16,
    sample_rate: u32,
    block_align: u16,
    silence: Silence,
}

fn bad_wav(why: &str) -> Unsupported {
    refuse("this WAV recording", why)
}

fn wav_layout(h: &[u8]) -> Result<AudioLayout, Unsupported> {
    if h.get(..4) != Some(b"RIFF") || h.get(8..12) != Some(b"WAVE") {
        let why = if h.get(..4) == Some(b"RF64") {
            "RF64/BW64 files are not supported"
        } else {
            "it does not start with a RIFF/WAVE header"
        };
        return Err(bad_wav(why));
    }
    // The RIFF size is not trusted: streaming writers leave it 0 or
    // 0xFFFFFFFF, and only the data chunk's own size matters here.
    let mut pos: usize = 12;
    let mut format: Option<WavFormat> = None;
    loop {
        let (Some(id), Some(size)) = (h.get(pos..pos.saturating_add(4)), u32_at(h, pos.saturating_add(4))) else {
            return Err(bad_wav(&format!(
                "no data chunk header within the first {} bytes (header truncated or too large)",
                h.len()
            )));
        };
        let body = pos + 8;
        match id {
            b"data" => {
                let Some(format) = format else {
                    return Err(bad_wav("the data chunk comes before the fmt chunk"));
                };
                let data_len = match size {
                    0 | u32::MAX => None,
                    n => Some(u64::from(n)),
                };
                return Ok(AudioLayout {
                    data_offset: body as u64,
                    data_len,
                    frame_bytes: u32::from(format.block_align),
                    sample_rate: format.sample_rate,
                    channels: format.channels,
                    silence: format.silence,
                });
            }
            b"fmt " => {
                if format.is_some() {
                    // Two readers could pick different ones: refuse rather
                    // than silence by the wrong layout.
                    return Err(bad_wav("it has two fmt chunks"));
                }
                let end = body.checked_add(size as usize).filter(|&e| e <= h.len());
                let Some(end) = end else {
                    return Err(bad_wav("its fmt chunk is truncated"));
                };
                format = Some(wav_format(&h[body..end])?);
            }
            _ => {}
        }
        // Chunks are padded to an even size; the pad byte is not counted.
        let skip = u64::from(size) + u64::from(size & 1);
        pos = usize::try_from((body as u64).saturating_add(skip)).unwrap_or(usize::MAX);
    }
}

fn wav_format(f: &[u8]) -> Result<WavFormat, Unsupported> {
    let (Some(tag), Some(channels), Some(sample_rate), Some(block_align), Some(bits)) =
        (u16_at(f, 0), u16_at(f, 2), u32_at(f, 4), u16_at(f, 12), u16_at(f, 14))
    else {
        return Err(bad_wav("its fmt chunk is shorter than 16 bytes"));
    };
    let code = if tag == WAVE_FORMAT_EXTENSIBLE {
        // cbSize (22) at 16, valid bits at 18, channel mask at 20, GUID at 24..40.
        let (Some(cb), Some(guid)) = (u16_at(f, 16), f.get(24..40)) else {
            return Err(bad_wav("its WAVE_FORMAT_EXTENSIBLE fmt chunk is shorter than 40 bytes"));
        };
        if cb < 22 || guid[2..4] != [0, 0] || guid[4..] != KSDATAFORMAT_TAIL {
            return Err(bad_wav("its WAVE_FORMAT_EXTENSIBLE sub-format is not a standard one"));
        }
        u16::from_le_bytes([guid[0], guid[1]])
    } else {
        tag
    };
    let silence = match (code, bits) {
        (WAVE_FORMAT_PCM, 1..=8) => Silence::Pcm8Unsigned,
        (WAVE_FORMAT_PCM, 9..=16) => Silence::Pcm16Le,
        (WAVE_FORMAT_PCM, 17..=24) => Silence::Pcm24Le,
        (WAVE_FORMAT_PCM, 25..=32) => Silence::Pcm32Le,
        (WAVE_FORMAT_IEEE_FLOAT, 32) => Silence::Float32Le,
        (WAVE_FORMAT_IEEE_FLOAT, 64) => Silence::Float64Le,
        (WAVE_FORMAT_ALAW, 8) => Silence::ALaw,
        (WAVE_FORMAT_MULAW, 8) => Silence::MuLaw,
        (WAVE_FORMAT_PCM | WAVE_FORMAT_IEEE_FLOAT | WAVE_FORMAT_ALAW | WAVE_FORMAT_MULAW, _) => {
            return Err(bad_wav(&format!("format {code} with {bits} bits per sample is not valid")));
        }
        (2 | 0x11, _) => return Err(refuse("ADPCM WAV recordings", COMPRESSED)),
        (0x55, _) => return Err(refuse("MP3-in-WAV recordings", COMPRESSED)),
        _ => {
            return Err(bad_wav(&format!("WAV format 0x{code:04X} is not linear PCM, IEEE float, A-law or μ-law")));
        }
    };
    if channels == 0 || sample_rate == 0 {
        return Err(bad_wav("its fmt chunk declares no channels or a sample rate of 0"));
    }
    // A block align that disagrees with channels × sample size would put our
    // frame boundaries somewhere the player's are not.
    let sample_bytes = bits.div_ceil(8);
    if u32::from(block_align) != u32::from(channels) * u32::from(sample_bytes) {
        return Err(bad_wav(&format!(
            "its block align {block_align} is not {channels} channels × {sample_bytes} bytes per sample"
        )));
    }
    Ok(WavFormat { channels, sample_rate, block_align, silence })
}

/// Sun/NeXT `.snd`: big-endian header of magic, data offset, data size,
/// encoding, rate, channels.
fn au_layout(h: &[u8]) -> Result<AudioLayout, Unsupported> {
    let (Some(offset), Some(size), Some(encoding), Some(rate), Some(channels)) =
        (u32_be_at(h, 4), u32_be_at(h, 8), u32_be_at(h, 12), u32_be_at(h, 16), u32_be_at(h, 20))
    else {
        return Err(refuse("this .snd recording", "its header is truncated"));
    };
    let silence = match encoding {
        AU_MULAW => Silence::MuLaw,
        AU_ALAW => Silence::ALaw,
        other => return Err(refuse("this .snd recording", &format!("encoding {other} is not μ-law or A-law"))),
    };
    let channels = u16::try_from(channels).ok().filter(|&c| c > 0);
    let (Some(channels), true, true) = (channels, rate > 0, offset >= 24) else {
        return Err(refuse("this .snd recording", "its header is malformed"));
    };
    Ok(AudioLayout {
        data_offset: u64::from(offset),
        data_len: (size != u32::MAX).then_some(u64::from(size)),
        frame_bytes: u32::from(channels),
        sample_rate: rate,
        channels,
        silence,
    })
}

/// The bytes of the object that hold the frames `span` touches: the start
/// rounded down and the end rounded up to whole frames, so no part of a
/// sample in the span survives. Never before the data start nor after its
/// declared end; empty for a zero-length or reversed span.
pub fn byte_range(layout: &AudioLayout, span: &Span) -> Range<u64> {
    let start = layout.data_offset;
    if span.end_ms <= span.start_ms || layout.sample_rate == 0 || layout.frame_bytes == 0 {
        return start..start;
    }
    let end = layout.data_len.map_or(u64::MAX, |len| start.saturating_add(len));
    let rate = u128::from(layout.sample_rate);
    let first_frame = u128::from(span.start_ms) * rate / 1000;
    let end_frame = (u128::from(span.end_ms) * rate).div_ceil(1000);
    let at = |frame: u128| {
        let byte = u128::from(start) + frame * u128::from(layout.frame_bytes);
        u64::try_from(byte).unwrap_or(u64::MAX).min(end)
    };
    at(first_frame)..at(end_frame)
}

/// Overwrites with silence every sample byte of `window` whose frame lies in
/// any of `spans`. `window` holds the plaintext of the object from byte
/// `window_offset` on; it may start or end anywhere (in the header, mid
/// frame), and silencing the windows of any split of the object gives the
/// same bytes as silencing the whole. Spans may overlap, be unsorted, be
/// empty or reach past the end.
pub fn silence_window(layout: &AudioLayout, spans: &[Span], window_offset: u64, window: &mut [u8]) {
    let window_end = window_offset.saturating_add(window.len() as u64);
    let fill = layout.silence.byte();
    for span in spans {
        let r = byte_range(layout, span);
        let (lo, hi) = (r.start.max(window_offset), r.end.min(window_end));
        if lo >= hi {
            continue;
        }
        // Both are within the window, so the differences fit in usize.
        let (lo, hi) = ((lo - window_offset) as usize, (hi - window_offset) as usize);
        if let Some(bytes) = window.get_mut(lo..hi) {
            bytes.fill(fill);
        }
    }
}

/// Checks spans given by a client: each non-empty (`end_ms` after
/// `start_ms`), at most [`MAX_SPANS`], and, when the duration is known, each
/// starting within the recording (a span past the end is most likely given in
/// the wrong unit, and would silence nothing).
pub fn validate_spans(spans: &[Span], duration_ms: Option<u64>) -> Result<(), String> {
    if spans.len() > MAX_SPANS {
        return Err(format!(
            "{} sensitive spans given; at most {MAX_SPANS} are accepted per recording (merge adjacent spans)",
            spans.len()
        ));
    }
    for (i, s) in spans.iter().enumerate() {
        if s.end_ms <= s.start_ms {
            return Err(format!(
                "sensitive span {i} is empty or reversed: end_ms {} must be after start_ms {}",
                s.end_ms, s.start_ms
            ));
        }
        if let Some(d) = duration_ms
            && s.start_ms >= d
        {
            return Err(format!(
                "sensitive span {i} starts at {} ms but the recording lasts {d} ms (spans are in milliseconds)",
                s.start_ms
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV header: `fmt` chunk body as given, optional extra chunks before
    /// `data`, then the data chunk header.
    fn wav(fmt_body: &[u8], extra: &[(&[u8; 4], &[u8])], data_size: u32) -> Vec<u8> {
        let mut h = b"RIFF\0\0\0\0WAVE".to_vec();
        let mut chunk = |id: &[u8; 4], body: &[u8]| {
            h.extend_from_slice(id);
            h.extend_from_slice(&(body.len() as u32).to_le_bytes());
            h.extend_from_slice(body);
            if body.len() % 2 == 1 {
                h.push(0);
            }
        };
        for (id, body) in extra {
            chunk(id, body);
        }
        chunk(b"fmt ", fmt_body);
        h.extend_from_slice(b"data");
        h.extend_from_slice(&data_size.to_le_bytes());
        h
    }

    fn fmt(tag: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let align = channels * bits.div_ceil(8);
        let mut f = Vec::new();
        f.extend_from_slice(&tag.to_le_bytes());
        f.extend_from_slice(&channels.to_le_bytes());
        f.extend_from_slice(&rate.to_le_bytes());
        f.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        f.extend_from_slice(&align.to_le_bytes());
        f.extend_from_slice(&bits.to_le_bytes());
        f
    }

    fn extensible(sub: u16, channels: u16, rate: u32, bits: u16) -> Vec<u8> {
        let mut f = fmt(WAVE_FORMAT_EXTENSIBLE, channels, rate, bits);
        f.extend_from_slice(&22u16.to_le_bytes());
        f.extend_from_slice(&bits.to_le_bytes());
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&u32::from(sub).to_le_bytes());
        f.extend_from_slice(&KSDATAFORMAT_TAIL);
        f
    }

    /// Deterministic xorshift, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
    }

    /// An object: header then `data_bytes` of non-silent samples, then a
    /// trailing chunk the data size excludes.
    fn object(header: &[u8], data_bytes: usize, trailer: &[u8]) -> Vec<u8> {
        let mut o = header.to_vec();
        o.extend(
            (0..data_bytes)
                .map(|i| (i % 251) as u8 | 0x01)
                .map(|b| if matches!(b, 0x80 | 0xD5 | 0xFF) { 0x11 } else { b }),
        );
        o.extend_from_slice(trailer);
        o
    }

    fn silenced_whole(l: &AudioLayout, spans: &[Span], obj: &[u8]) -> Vec<u8> {
        let mut whole = obj.to_vec();
        silence_window(l, spans, 0, &mut whole);
        whole
    }

    #[test]
    fn card_number_in_ten_seconds_of_mulaw_is_exactly_bytes_24000_to_60000() {
        let l = layout("audio/basic", &[0x12; 64]).unwrap();
        let obj = object(&[], 80_000, &[]);
        let spans = [Span { start_ms: 3000, end_ms: 7500 }];
        assert_eq!(byte_range(&l, &spans[0]), 24_000..60_000);
        let out = silenced_whole(&l, &spans, &obj);
        assert!(out[24_000..60_000].iter().all(|&b| b == 0xFF));
        assert_eq!(out[..24_000], obj[..24_000]);
        assert_eq!(out[60_000..], obj[60_000..]);
        assert_eq!(l.duration_ms(80_000), 10_000);
        for t in ["audio/pcmu", "audio/PCMU", "audio/PCMU; rate=8000", " audio/basic "] {
            assert_eq!(layout(t, b"").unwrap(), l, "{t}");
        }
        let a = layout("audio/PCMA", b"").unwrap();
        assert_eq!((a.silence, a.sample_rate, a.frame_bytes, a.data_offset), (Silence::ALaw, 8000, 1, 0));
        assert_eq!(Silence::ALaw.byte(), 0xD5);
    }

    #[test]
    fn pcm16_stereo_wav() {
        let h = wav(&fmt(1, 2, 44_100, 16), &[(b"LIST", b"INFOISFT\x03\0\0\0ab\0")], 4 * 44_100);
        let l = layout("audio/wav", &h).unwrap();
        assert_eq!(l.data_offset, h.len() as u64);
        assert_eq!((l.data_len, l.frame_bytes, l.sample_rate, l.channels), (Some(176_400), 4, 44_100, 2));
        assert_eq!(l.silence, Silence::Pcm16Le);
        // 1 ms at 44.1 kHz is 44.1 frames: frames 44..89 cover [1 ms, 2 ms).
        let r = byte_range(&l, &Span { start_ms: 1, end_ms: 2 });
        assert_eq!(r, l.data_offset + 44 * 4..l.data_offset + 89 * 4);
        assert_eq!((r.end - r.start) % 4, 0, "whole frames");
        // Past the end: clamped to the declared data, never the trailer.
        let r = byte_range(&l, &Span { start_ms: 900, end_ms: 5_000 });
        assert_eq!(r.end, l.data_offset + 176_400);
        let r = byte_range(&l, &Span { start_ms: 2_000, end_ms: u64::MAX });
        assert!(r.is_empty() && r.start == l.data_offset + 176_400);
    }

    #[test]
    fn other_wav_encodings() {
        let cases = [
            (fmt(6, 1, 8000, 8), Silence::ALaw, 1),
            (fmt(7, 2, 8000, 8), Silence::MuLaw, 2),
            (fmt(1, 1, 8000, 8), Silence::Pcm8Unsigned, 1),
            (fmt(1, 2, 48_000, 24), Silence::Pcm24Le, 6),
            (fmt(1, 1, 48_000, 32), Silence::Pcm32Le, 4),
            (fmt(3, 2, 48_000, 32), Silence::Float32Le, 8),
            (fmt(3, 1, 48_000, 64), Silence::Float64Le, 8),
            (extensible(1, 2, 48_000, 24), Silence::Pcm24Le, 6),
            (extensible(3, 6, 48_000, 32), Silence::Float32Le, 24),
            (extensible(7, 1, 8000, 8), Silence::MuLaw, 1),
            (extensible(6, 1, 8000, 8), Silence::ALaw, 1),
        ];
        for (f, silence, frame) in cases {
            let l = layout("audio/x-wav", &wav(&f, &[], 1000)).unwrap();
            assert_eq!((l.silence, l.frame_bytes), (silence, frame), "{silence:?}");
        }
        assert_eq!(Silence::Pcm8Unsigned.byte(), 0x80);
        assert_eq!(Silence::MuLaw.byte(), 0xFF);
        assert_eq!(Silence::Pcm24Le.byte(), 0);
    }

    #[test]
    fn odd_chunks_are_padded_and_streaming_sizes_mean_to_the_end() {
        let h = wav(&fmt(1, 1, 8000, 16), &[(b"junk", b"abc"), (b"LIST", b"x")], 0);
        let l = layout("audio/wav", &h).unwrap();
        assert_eq!(l.data_offset, h.len() as u64);
        assert_eq!(l.data_len, None);
        let h = wav(&fmt(1, 1, 8000, 16), &[], u32::MAX);
        assert_eq!(layout("audio/wav", &h).unwrap().data_len, None);
        // An odd fmt chunk (a trailing byte after the fields) is padded too.
        let mut f = fmt(1, 1, 8000, 16);
        f.push(0);
        let h = wav(&f, &[], 10);
        assert_eq!(layout("audio/wav", &h).unwrap().data_offset, h.len() as u64);
    }

    #[test]
    fn any_split_into_windows_equals_silencing_the_whole() {
        let mut rng = Rng(0x5EED_CAFE_F00D_0001);
        let layouts = [
            (
                wav(&fmt(1, 2, 8000, 16), &[(b"LIST", b"abc")], 8000 * 4 * 2),
                8000 * 4 * 2,
                b"LIST\x02\0\0\0zz".as_slice(),
            ),
            (wav(&fmt(6, 1, 8000, 8), &[], 16_000), 16_000, b"".as_slice()),
            (wav(&extensible(1, 3, 11_025, 24), &[], 0), 11_025 * 9 * 2, b"".as_slice()),
            (Vec::new(), 16_000, b"".as_slice()),
        ];
        for (header, data_bytes, trailer) in layouts {
            let l = if header.is_empty() { layout("audio/pcmu", b"") } else { layout("audio/wav", &header) }.unwrap();
            let obj = object(&header, data_bytes, trailer);
            for _ in 0..200 {
                let n = rng.below(6) as usize;
                let spans: Vec<Span> = (0..n)
                    .map(|_| {
                        let a = rng.below(2600);
                        let b = if rng.below(5) == 0 { a } else { a + rng.below(800) };
                        Span { start_ms: a, end_ms: b }
                    })
                    .collect();
                let whole = silenced_whole(&l, &spans, &obj);
                // Split into random windows, each silenced on its own.
                let mut split = obj.clone();
                let mut at = 0;
                while at < split.len() {
                    let max = if rng.below(3) == 0 { 7 } else { 5000 };
                    let len = 1 + rng.below(max) as usize;
                    let end = (at + len).min(split.len());
                    silence_window(&l, &spans, at as u64, &mut split[at..end]);
                    at = end;
                }
                assert_eq!(split, whole, "{spans:?}");
                // Bytes outside every span's frames are untouched; inside, silent.
                let mut covered = vec![false; obj.len()];
                for s in &spans {
                    let r = byte_range(&l, s);
                    let (lo, hi) = (r.start.min(obj.len() as u64) as usize, r.end.min(obj.len() as u64) as usize);
                    covered[lo..hi].fill(true);
                }
                for (i, (&w, &o)) in whole.iter().zip(&obj).enumerate() {
                    if covered[i] {
                        assert_eq!(w, l.silence.byte(), "byte {i}");
                        assert!(i as u64 >= l.data_offset, "header byte {i} silenced");
                    } else {
                        assert_eq!(w, o, "byte {i} outside the spans changed");
                    }
                }
                for s in &spans {
                    let r = byte_range(&l, s);
                    assert_eq!((r.start - l.data_offset) % u64::from(l.frame_bytes), 0, "{s:?}");
                    let data_end = l.data_len.map_or(u64::MAX, |d| l.data_offset + d);
                    assert!(
                        r.end == data_end || (r.end - l.data_offset).is_multiple_of(u64::from(l.frame_bytes)),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn windows_far_out_or_empty_are_harmless() {
        let l = layout("audio/pcma", b"").unwrap();
        let spans = [Span { start_ms: 0, end_ms: u64::MAX }, Span { start_ms: u64::MAX - 1, end_ms: u64::MAX }];
        let mut w = [1u8; 16];
        silence_window(&l, &spans, u64::MAX - 16, &mut w);
        assert!(w.iter().all(|&b| b == 0xD5));
        silence_window(&l, &spans, 5, &mut []);
        let l = AudioLayout { sample_rate: 0, frame_bytes: 0, ..l };
        let mut w = [1u8; 4];
        silence_window(&l, &spans, 0, &mut w);
        assert_eq!(w, [1; 4]);
    }

    #[test]
    fn compressed_and_malformed_are_unsupported() {
        let e = layout("audio/mpeg", b"ID3\x04").unwrap_err();
        assert!(e.0.contains("cannot be silenced in place") && e.0.contains("refused"), "{e}");
        for t in ["audio/ogg", "audio/opus", "audio/flac", "image/png", "", "text/plain; charset=utf-8"] {
            assert!(layout(t, b"whatever").is_err(), "{t}");
        }
        let e = layout("audio/wav", &wav(&fmt(0x11, 1, 8000, 4), &[], 100)).unwrap_err();
        assert!(e.0.contains("ADPCM"), "{e}");
        assert!(layout("audio/wav", &wav(&fmt(2, 1, 8000, 4), &[], 100)).is_err());
        let bad = [
            wav(&fmt(1, 0, 8000, 16), &[], 100),       // no channels
            wav(&fmt(1, 1, 0, 16), &[], 100),          // no rate
            wav(&fmt(1, 1, 8000, 0), &[], 100),        // no bits
            wav(&fmt(3, 1, 8000, 16), &[], 100),       // 16-bit float
            wav(&fmt(7, 1, 8000, 16), &[], 100),       // 16-bit μ-law
            wav(&fmt(1, 1, 8000, 16)[..14], &[], 100), // short fmt
            wav(&fmt(0xFFFE, 1, 8000, 16), &[], 100),  // extensible without extension
        ];
        for (i, h) in bad.iter().enumerate() {
            assert!(layout("audio/wav", h).is_err(), "case {i}");
        }
        // Block align disagreeing with channels × bytes per sample.
        let mut f = fmt(1, 2, 8000, 16);
        f[12] = 2;
        assert!(layout("audio/wav", &wav(&f, &[], 100)).is_err());
        // A vendor sub-format GUID.
        let mut f = extensible(1, 1, 8000, 16);
        f[39] ^= 1;
        assert!(layout("audio/wav", &wav(&f, &[], 100)).is_err());
        // Two fmt chunks; data before fmt; no data chunk in the head; not RIFF.
        let f = fmt(1, 1, 8000, 16);
        assert!(layout("audio/wav", &wav(&f, &[(b"fmt ", &f)], 100)).is_err());
        let mut h = b"RIFF\0\0\0\0WAVEdata\x04\0\0\0".to_vec();
        h.extend_from_slice(&wav(&f, &[], 4)[12..]);
        assert!(layout("audio/wav", &h).is_err());
        let h = wav(&f, &[], 100);
        assert!(layout("audio/wav", &h[..h.len() - 1]).is_err(), "data chunk header cut");
        assert!(layout("audio/wav", &wav(&f, &[(b"LIST", &[0; 70_000])], 100)[..65_536]).is_err());
        assert!(layout("audio/wav", b"RF64\xFF\xFF\xFF\xFFWAVE").is_err());
        assert!(layout("audio/pcmu; rate=16000", b"").is_err());
        assert!(layout("audio/pcma; channels=2", b"").is_err());
    }

    #[test]
    fn sun_au_header_is_skipped() {
        let mut h = b".snd".to_vec();
        for v in [32u32, 16_000, AU_MULAW, 8000, 1] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        h.extend_from_slice(&[0; 8]);
        let l = layout("audio/basic", &h).unwrap();
        assert_eq!((l.data_offset, l.data_len, l.silence, l.frame_bytes), (32, Some(16_000), Silence::MuLaw, 1));
        assert_eq!(byte_range(&l, &Span { start_ms: 1000, end_ms: 1001 }), 8032..8040);
        h[15] = 3; // 16-bit linear
        assert!(layout("audio/basic", &h).is_err());
        assert!(layout("audio/basic", &h[..20]).is_err());
    }

    #[test]
    fn arbitrary_heads_never_panic() {
        let mut rng = Rng(0xF022_0000_0000_0001);
        let seeds = [wav(&fmt(1, 2, 8000, 16), &[(b"LIST", b"abc")], 100), wav(&extensible(3, 2, 8000, 32), &[], 0)];
        for i in 0..20_000 {
            let mut h = if i % 2 == 0 {
                let mut h = seeds[i % 4 / 2].clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(h.len() as u64) as usize;
                    h[at] = rng.next() as u8;
                }
                h
            } else {
                let mut h = b"RIFF\0\0\0\0WAVE".to_vec();
                h.extend((0..rng.below(80)).map(|_| rng.next() as u8));
                h
            };
            h.truncate(rng.below(h.len() as u64 + 1) as usize);
            for t in ["audio/wav", "audio/basic"] {
                if let Ok(l) = layout(t, &h) {
                    assert!(l.frame_bytes > 0 && l.sample_rate > 0 && l.data_offset as usize <= h.len(), "{h:?}");
                    let mut w = h.clone();
                    silence_window(&l, &[Span { start_ms: 0, end_ms: u64::MAX }], 0, &mut w);
                    assert_eq!(w[..l.data_offset as usize], h[..l.data_offset as usize]);
                }
            }
        }
    }

    #[test]
    fn spans_are_validated() {
        let s = |a, b| Span { start_ms: a, end_ms: b };
        assert!(validate_spans(&[], Some(10_000)).is_ok());
        assert!(validate_spans(&[s(3000, 7500), s(0, 1), s(5000, 20_000)], Some(10_000)).is_ok());
        let e = validate_spans(&[s(0, 1), s(5, 5)], None).unwrap_err();
        assert!(e.contains("span 1") && e.contains("empty"), "{e}");
        assert!(validate_spans(&[s(9, 3)], None).is_err());
        let e = validate_spans(&[s(10_000, 10_001)], Some(10_000)).unwrap_err();
        assert!(e.contains("lasts 10000 ms"), "{e}");
        assert!(validate_spans(&[s(10_000, 10_001)], None).is_ok());
        assert!(validate_spans(&vec![s(0, 1); MAX_SPANS], None).is_ok());
        let e = validate_spans(&vec![s(0, 1); MAX_SPANS + 1], None).unwrap_err();
        assert!(e.contains("at most 1000"), "{e}");
    }
}
