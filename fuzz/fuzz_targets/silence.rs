//! Span silencing: any head and type never panic, and silencing never touches bytes outside the sample data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recvault::retrieve::silence::{Span, byte_range, layout, silence_window, validate_spans};

/// Types `layout` reads, some it refuses, with parameters; an index past the end reads a type from the input.
const TYPES: &[&str] = &[
    "audio/wav",
    "audio/x-wav",
    "audio/basic",
    "audio/pcmu",
    "audio/pcma",
    "audio/pcmu; rate=8000; channels=1",
    "audio/pcma; rate=16000",
    "audio/mpeg",
    "audio/ogg",
    "audio/flac",
    "text/plain",
    "",
];

/// Input layout (hand-parsed so seed files can be real WAV and `.snd` headers):
/// `[type, nspans, spans as (start u32 LE, len u16 LE)..., ncuts, cuts as u16 LE..., offset u64 LE, object...]`.
/// A type byte past the list takes the next byte as a length and that many bytes as the type.
struct Case<'a> {
    content_type: String,
    spans: Vec<Span>,
    cuts: Vec<usize>,
    offset: u64,
    object: &'a [u8],
}

fn take<'a, const N: usize>(input: &mut &'a [u8]) -> Option<[u8; N]> {
    let (head, rest) = input.split_first_chunk::<N>()?;
    *input = rest;
    Some(*head)
}

fn parse(mut input: &[u8]) -> Option<Case<'_>> {
    let [t] = take::<1>(&mut input)?;
    let content_type = match TYPES.get(usize::from(t)) {
        Some(t) => (*t).to_owned(),
        None => {
            let [len] = take::<1>(&mut input)?;
            let (raw, rest) = input.split_at_checked(usize::from(len % 48))?;
            input = rest;
            String::from_utf8_lossy(raw).into_owned()
        }
    };
    let [nspans] = take::<1>(&mut input)?;
    let mut spans = Vec::new();
    for _ in 0..nspans % 16 {
        let start = u64::from(u32::from_le_bytes(take(&mut input)?));
        let len = u64::from(u16::from_le_bytes(take(&mut input)?));
        // A length of 0xFFFF stands for "to the end of time", so saturation and empty spans are both reached.
        let end = if len == 0xFFFF { u64::MAX } else { start + len };
        // An odd start byte reverses the span: unsorted, reversed and empty spans must all be harmless.
        spans.push(if start % 7 == 3 {
            Span { start_ms: end, end_ms: start }
        } else {
            Span { start_ms: start, end_ms: end }
        });
    }
    let [ncuts] = take::<1>(&mut input)?;
    let mut cuts = Vec::new();
    for _ in 0..ncuts % 8 {
        cuts.push(usize::from(u16::from_le_bytes(take(&mut input)?)));
    }
    let offset = u64::from_le_bytes(take(&mut input)?);
    Some(Case { content_type, spans, cuts, offset, object: input })
}

fuzz_target!(|input: &[u8]| {
    let Some(case) = parse(input) else { return };
    let object = case.object;
    let Ok(l) = layout(&case.content_type, object) else { return };

    let size = object.len() as u64;
    let start = l.data_offset;
    let end = l.data_end(size);
    assert!(end <= size, "data end {end} past the object ({size} bytes)");
    let _ = l.duration_ms(size);
    let _ = validate_spans(&case.spans, Some(l.duration_ms(size)));
    for s in &case.spans {
        let r = byte_range(&l, s);
        assert!(r.start >= start && r.start <= r.end, "span {s:?} maps to {r:?}, data starts at {start}");
    }

    // The whole object in one window: only sample bytes change, and only to the silence byte.
    let mut whole = object.to_vec();
    silence_window(&l, &case.spans, 0, &mut whole);
    for (i, (&before, &after)) in object.iter().zip(&whole).enumerate() {
        if before != after {
            let i = i as u64;
            assert!(i >= start && i < end, "byte {i} changed, outside the data {start}..{end}");
            assert_eq!(after, l.silence.byte(), "byte {i} was not set to silence");
        }
    }

    // Any split into windows gives the same bytes as the whole.
    let mut points: Vec<usize> = case.cuts.iter().map(|c| c % (object.len() + 1)).collect();
    points.sort_unstable();
    let mut pieces = Vec::with_capacity(object.len());
    let mut last = 0;
    for p in points.into_iter().chain([object.len()]) {
        let mut w = object[last..p].to_vec();
        silence_window(&l, &case.spans, last as u64, &mut w);
        pieces.extend_from_slice(&w);
        last = p;
    }
    assert_eq!(pieces, whole, "silencing depends on the window split");

    // A window at an arbitrary offset (up to the end of the address space) never reaches below the data.
    let mut w = object.to_vec();
    silence_window(&l, &case.spans, case.offset, &mut w);
    let below = usize::try_from(start.saturating_sub(case.offset)).unwrap_or(usize::MAX).min(w.len());
    assert_eq!(w[..below], object[..below], "a window at offset {} was written before the data", case.offset);
});
