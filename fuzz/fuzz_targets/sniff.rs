//! Content checks: any declared type and bytes never panic, and the verdict does not depend on the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recvault::ingest::sniff::{ContentChecker, SniffLimits, guess_content_type, normalise_content_type};
use recvault::model::{ContentKind, InvalidInput};

/// Every accepted type, some aliases and near misses; an index past the end reads a type from the input.
const TYPES: &[&str] = &[
    "audio/wav",
    "audio/mpeg",
    "audio/ogg",
    "audio/opus",
    "audio/flac",
    "audio/basic",
    "audio/pcmu",
    "audio/pcma",
    "text/plain; charset=utf-8",
    "application/json",
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/gif",
    "audio/x-wav",
    "image/jpg",
    "text/plain",
    "TEXT/PLAIN; Charset=\"UTF8\"",
    "text/plain; charset=latin1",
    "application/octet-stream",
    "",
];

/// Small caps, so the dimension checks are reached by small images too; the defaults are tried as well.
const SMALL: SniffLimits = SniffLimits { max_image_width: 300, max_image_height: 200, max_image_pixels: 40_000 };

/// Input layout (hand-parsed so seed files stay readable): `[type, limits, ncuts, cuts as u16 LE..., data...]`.
/// A type byte past the list takes the next byte as a length and that many bytes as the type.
struct Case<'a> {
    declared: String,
    limits: SniffLimits,
    cuts: Vec<usize>,
    data: &'a [u8],
}

fn parse(mut input: &[u8]) -> Option<Case<'_>> {
    let mut byte = || {
        let (b, rest) = input.split_first()?;
        input = rest;
        Some(*b)
    };
    let t = usize::from(byte()?);
    let limits = if byte()? % 2 == 0 { SniffLimits::default() } else { SMALL };
    let ncuts = usize::from(byte()? % 8);
    let declared = match TYPES.get(t) {
        Some(t) => (*t).to_owned(),
        None => {
            let len = usize::from(byte()? % 48);
            let (raw, rest) = input.split_at_checked(len)?;
            input = rest;
            String::from_utf8_lossy(raw).into_owned()
        }
    };
    let mut cuts = Vec::with_capacity(ncuts);
    for _ in 0..ncuts {
        let (c, rest) = input.split_first_chunk::<2>()?;
        cuts.push(usize::from(u16::from_le_bytes(*c)));
        input = rest;
    }
    Some(Case { declared, limits, cuts, data: input })
}

/// Feeds `parts` in order and finishes; the first refusal is the verdict.
fn verdict<'a>(t: &str, limits: SniffLimits, parts: impl IntoIterator<Item = &'a [u8]>) -> Result<(), InvalidInput> {
    let mut c = ContentChecker::new(t, limits);
    for p in parts {
        c.update(p)?;
    }
    c.finish()
}

fuzz_target!(|input: &[u8]| {
    let Some(case) = parse(input) else { return };
    let data = case.data;

    // Canonical types are fixed points, so a reused upload id compares equal however it was spelled.
    let mut normalised = None;
    for kind in ContentKind::ALL {
        let _ = guess_content_type(kind, data);
        if let Ok(t) = normalise_content_type(kind, &case.declared) {
            assert_eq!(normalise_content_type(kind, &t).as_ref(), Ok(&t), "{kind:?} {:?} is not a fixed point", t);
            normalised = Some(t);
        }
    }
    // An unnormalised type must be refused by the checker, so both are worth feeding.
    for t in normalised.iter().chain([&case.declared]) {
        let whole = verdict(t, case.limits, [data]).is_ok();

        let mut points: Vec<usize> = case.cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut parts = Vec::with_capacity(points.len() + 1);
        let mut last = 0;
        for p in points.into_iter().chain([data.len()]) {
            parts.push(&data[last..p]);
            last = p;
        }
        let split = verdict(t, case.limits, parts.iter().copied()).is_ok();
        assert_eq!(whole, split, "{t:?}: verdict changed with cuts {:?}", case.cuts);

        // Byte by byte is the most extreme split; bounded because an image re-reads its head on every byte.
        if data.len() <= 2048 {
            let bytewise = verdict(t, case.limits, data.chunks(1)).is_ok();
            assert_eq!(whole, bytewise, "{t:?}: verdict changed when fed byte by byte");
        }
    }
});
