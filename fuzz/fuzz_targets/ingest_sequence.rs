//! The ingest state machine driven by arbitrary client message sequences (opens, data at any offset, finishes, reconnects) against a real in-process service, checking its invariants.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use recvault::audit::Actor;
use recvault::crypto::format;
use recvault::error::Error;
use recvault::ingest::{ClientMsg, Ingest, ServerMsg};
use recvault::model::{ContentKind, CustomerId, Interaction, ObjectSpec, UploadId};
use recvault::store::Store;
use tokio::sync::mpsc;

/// The service, opened once per fuzzing process over a scratch directory
/// (embedded defaults: SQLite catalog, local key file, local object files).
struct Service {
    rt: tokio::runtime::Runtime,
    ingest: std::sync::Arc<Ingest>,
    store: Store,
    _dir: tempfile::TempDir,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = recvault::config::Config { data_dir: dir.path().to_owned(), ..Default::default() };
        let parts = rt.block_on(recvault::server::open(&cfg)).expect("service opens");
        Service { rt, ingest: parts.ingest, store: parts.store, _dir: dir }
    })
}

/// Declared (kind, type) pairs: mostly raw audio, which any bytes satisfy,
/// so sequences reach commits; the rest exercise refusals.
const SPECS: &[(ContentKind, &str)] = &[
    (ContentKind::CallRecording, "audio/pcmu"),
    (ContentKind::CallRecording, "audio/pcmu"),
    (ContentKind::CallRecording, "audio/pcma"),
    (ContentKind::CallRecording, "audio/wav"),
    (ContentKind::ChatTranscript, "text/plain"),
    (ContentKind::ChatTranscript, "application/json"),
    (ContentKind::Image, "image/png"),
    (ContentKind::CallRecording, "image/png"),
    (ContentKind::CallRecording, "no/such-type"),
];

/// Reads the fuzz input as a little program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte().unwrap_or(0)) << 8 | u16::from(self.byte().unwrap_or(0))
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
}

/// What the harness knows of one upload id across the streams of an input.
#[derive(Default, Clone)]
struct Model {
    /// Bytes the server accepted in order (each from the offset it expected).
    accepted: Vec<u8>,
    committed: Option<(u64, [u8; 32])>,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().try_into().unwrap()
}

fn spec(i: usize, customer: u8) -> ObjectSpec {
    let (kind, content_type) = SPECS[i % SPECS.len()];
    ObjectSpec {
        customer_id: CustomerId::parse(&format!("fuzz-{}", customer % 2)).unwrap(),
        kind,
        content_type: content_type.into(),
        interaction: Interaction { interaction_id: "fuzz".into(), ..Default::default() },
        sensitive_spans: Vec::new(),
    }
}

/// The statuses ingest documents for a client's mistakes; anything else
/// (internal, integrity, storage) is a bug when the storage is healthy.
fn documented(e: &Error) -> bool {
    matches!(e, Error::Invalid(_) | Error::Precondition(_) | Error::TooLarge(_) | Error::Busy(_) | Error::NotFound(_))
}

fuzz_target!(|data: &[u8]| {
    let svc = service();
    let mut input = Input(data);
    // Three upload ids per input, fresh for every input.
    let ids: Vec<UploadId> = (0..3).map(|_| UploadId::new_random()).collect();
    let mut models = vec![Model::default(); ids.len()];
    // Up to four streams (reconnects) per input.
    for _ in 0..4 {
        if input.0.is_empty() {
            break;
        }
        let msgs = read_stream(&mut input, &ids, &models);
        run_stream(svc, &mut models, msgs);
    }
});

/// One stream's messages, up to a "reconnect" byte or the end of input.
/// Data offsets are mostly "where the client believes the server is" and
/// finishes mostly carry the right digest and size, so sequences reach
/// commits; the rest is arbitrary.
fn read_stream(input: &mut Input<'_>, ids: &[UploadId], models: &[Model]) -> (Option<usize>, Vec<ClientMsg>) {
    let mut upload = None;
    let mut client_bytes: Vec<u8> = Vec::new();
    let mut msgs = Vec::new();
    while let Some(op) = input.byte() {
        match op % 8 {
            0 | 1 => {
                let which = usize::from(input.byte().unwrap_or(0)) % ids.len();
                let s = usize::from(input.byte().unwrap_or(0));
                let customer = input.byte().unwrap_or(0);
                if msgs.is_empty() {
                    upload = Some(which);
                    client_bytes = models[which].accepted.clone();
                }
                msgs.push(ClientMsg::Open { upload_id: ids[which], spec: spec(s, customer) });
            }
            2..=4 => {
                let how = input.byte().unwrap_or(0);
                let len = usize::from(input.byte().unwrap_or(0)) * 16;
                let mut fill = input.bytes(len);
                fill.resize(len, how);
                let offset = if how == 0xff { u64::from(input.u16()) } else { client_bytes.len() as u64 };
                if offset == client_bytes.len() as u64 {
                    client_bytes.extend_from_slice(&fill);
                }
                msgs.push(ClientMsg::Data { offset, data: Bytes::from(fill) });
            }
            5 | 6 => {
                let flags = input.byte().unwrap_or(0);
                let msg = if flags & 4 == 0 {
                    ClientMsg::Finish {
                        expected_sha256: Some(sha256(&client_bytes)),
                        expected_size: Some(client_bytes.len() as u64),
                    }
                } else {
                    ClientMsg::Finish {
                        expected_sha256: (flags & 1 == 1).then_some([flags; 32]),
                        expected_size: (flags & 2 == 2).then_some(u64::from(flags)),
                    }
                };
                msgs.push(msg);
            }
            _ => break,
        }
    }
    (upload, msgs)
}

/// Runs one stream through the real ingest use-case and checks its answers.
fn run_stream(svc: &Service, models: &mut [Model], (upload, sent): (Option<usize>, Vec<ClientMsg>)) {
    if sent.is_empty() {
        return;
    }
    let answers = svc.rt.block_on(async {
        let (tx, mut rx) = mpsc::channel(1024);
        let inbound = futures::stream::iter(sent.iter().map(clone_msg).map(Ok).collect::<Vec<_>>());
        let driver = tokio::spawn(svc.ingest.clone().run_stream(Actor::system("fuzz"), inbound, tx));
        let mut answers = Vec::new();
        while let Some(a) = rx.recv().await {
            answers.push(a);
        }
        driver.await.expect("run_stream panicked");
        answers
    });
    check(svc, models, upload, &sent, answers);
}

fn clone_msg(m: &ClientMsg) -> ClientMsg {
    match m {
        ClientMsg::Open { upload_id, spec } => ClientMsg::Open { upload_id: *upload_id, spec: spec.clone() },
        ClientMsg::Data { offset, data } => ClientMsg::Data { offset: *offset, data: data.clone() },
        ClientMsg::Finish { expected_sha256, expected_size } => {
            ClientMsg::Finish { expected_sha256: *expected_sha256, expected_size: *expected_size }
        }
    }
}

/// The invariants of one stream's answers.
fn check(
    svc: &Service,
    models: &mut [Model],
    upload: Option<usize>,
    sent: &[ClientMsg],
    answers: Vec<Result<ServerMsg, Error>>,
) {
    let mut errors = 0;
    let mut last_ack = 0;
    let mut opened = false;
    for a in &answers {
        assert_eq!(errors, 0, "an answer after the final error");
        match a {
            Err(e) => {
                errors += 1;
                assert!(documented(e), "undocumented error: {e:?}");
            }
            Ok(ServerMsg::Opened { durable_offset, committed, .. }) => {
                assert!(!opened, "opened twice");
                opened = true;
                let m = &mut models[upload.expect("opened without an open")];
                match committed {
                    Some(record) => {
                        assert_eq!(*durable_offset, record.size);
                        if let Some(known) = m.committed {
                            assert_eq!(known, (record.size, record.sha256), "a committed upload changed");
                        }
                        m.committed = Some((record.size, record.sha256));
                    }
                    None => {
                        assert!(m.committed.is_none(), "a committed upload reopened as uncommitted");
                        // The durable bytes are a prefix of what was sent
                        // (all of it unless a refusal discarded the upload).
                        assert!(*durable_offset <= m.accepted.len() as u64, "durable offset beyond the bytes sent");
                        m.accepted.truncate(*durable_offset as usize);
                        last_ack = *durable_offset;
                    }
                }
            }
            Ok(ServerMsg::Ack { durable_offset }) => {
                assert!(opened, "an ack before the open");
                assert!(*durable_offset >= last_ack, "acks went backwards");
                last_ack = *durable_offset;
            }
            Ok(ServerMsg::Committed(record)) => {
                let m = &mut models[upload.expect("committed without an open")];
                if m.committed.is_none() {
                    let bytes = in_order(sent, &m.accepted);
                    assert_eq!(record.size, bytes.len() as u64, "committed size is not the bytes accepted");
                    assert_eq!(record.sha256, sha256(&bytes), "committed object is not the bytes accepted");
                }
                m.committed = Some((record.size, record.sha256));
                let stored = svc.rt.block_on(svc.store.size(&record.object_id)).expect("committed object stored");
                let expected = format::ciphertext_len(record.size, format::DEFAULT_SEGMENT_SIZE);
                assert_eq!(stored, expected, "stored ciphertext has the wrong length");
            }
        }
    }
    if let Some(u) = upload
        && opened
        && models[u].committed.is_none()
    {
        let bytes = in_order(sent, &models[u].accepted);
        assert!(last_ack <= bytes.len() as u64, "ack {last_ack} beyond the {} bytes received", bytes.len());
        models[u].accepted = bytes;
    }
}

/// What the server can have accepted from this stream: the durable prefix,
/// then each data message at exactly the next offset, up to the first that
/// was not (the server ends the stream there).
fn in_order(sent: &[ClientMsg], durable: &[u8]) -> Vec<u8> {
    let mut bytes = durable.to_vec();
    for m in sent.iter().skip(1) {
        match m {
            ClientMsg::Data { offset, data } if *offset == bytes.len() as u64 => bytes.extend_from_slice(data),
            _ => break,
        }
    }
    bytes
}
