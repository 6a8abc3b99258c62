"""Interop: drive recvault with Python grpcio (a client that is not ours).

Stubs are generated from proto/ at test time with grpcio-tools, so the test
checks the published wire contract, not our Rust types. The server is the
real binary on a loopback port with a fresh data directory.
"""

import hashlib
import math
import os
import struct
import subprocess
import sys
import tempfile
import uuid
import wave
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN = Path(__file__).resolve().parent / "gen"
BINARY = Path(os.environ.get("RECVAULT_BIN", ROOT / "target" / "debug" / "recvault"))


sys.path.insert(0, str(ROOT / "tests" / "pyshared"))
from rvgrpc import BearerToken, Feeder, generate_stubs  # noqa: E402

pb, rpc = generate_stubs(GEN)


@pytest.fixture(scope="module")
def server():
    assert BINARY.exists(), f"build the server first (cargo build): {BINARY}"
    data = tempfile.mkdtemp(prefix="recvault-interop-")
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", data],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("recvault serving on "), line
    addr = line.split()[3]
    channel = grpc.insecure_channel(
        addr,
        options=[("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)],
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    # The bootstrap admin token (written 0600 into the data directory)
    # creates an operator token with every role through the API.
    admin_token = (Path(data) / "admin.token").read_text().strip()
    admin = rpc.RecvaultStub(grpc.intercept_channel(channel, BearerToken(admin_token)))
    made = admin.CreateToken(
        pb.CreateTokenRequest(
            name="py-operator",
            roles=[pb.INGEST, pb.COACH, pb.RETENTION, pb.ADMIN, pb.AUDITOR],
            unredacted=True,
        )
    )
    assert made.token.startswith("rvt_") and made.info.name == "py-operator"
    stub = rpc.RecvaultStub(grpc.intercept_channel(channel, BearerToken(made.token)))
    yield stub, data, channel
    channel.close()
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A real WAV file written by Python's wave module: 20 s, 16 kHz mono."""
    path = tmp_path_factory.mktemp("wav") / "call.wav"
    rate = 16000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(rate * 20):
            frames += struct.pack("<h", int(9000 * math.sin(2 * math.pi * 440 * i / rate)) + (i * 7919) % 97)
        w.writeframes(bytes(frames))
    return path.read_bytes()


def spec(customer):
    return pb.ObjectSpec(
        customer_id=customer,
        kind=pb.CALL_RECORDING,
        content_type="audio/x-wav",
        interaction=pb.Interaction(interaction_id="py-call-1", agent_id="agent-3", queue="support", direction=pb.INBOUND),
    )


def data_msgs(data, start, end, chunk=256 * 1024):
    for off in range(start, end, chunk):
        yield pb.IngestRequest(data=pb.IngestRequest.Data(offset=off, data=data[off : min(off + chunk, end)]))


def test_stream_resume_range_and_sha(server, recording):
    stub, data_dir, _ = server
    upload_id = str(uuid.uuid4())
    cut = len(recording) // 2 + 12345

    # First stream: send half, wait until it is acked, then drop the stream.
    feeder = Feeder()
    responses = stub.Ingest(iter(feeder))
    feeder.put(pb.IngestRequest(open=pb.IngestRequest.Open(upload_id=upload_id, spec=spec("py-cust-1"))))
    opened = next(responses)
    assert opened.WhichOneof("msg") == "opened"
    assert opened.opened.durable_offset == 0
    object_id = opened.opened.object_id
    for m in data_msgs(recording, 0, cut):
        feeder.put(m)
    acked = 0
    for r in responses:
        if r.WhichOneof("msg") == "ack":
            acked = r.ack.durable_offset
            if acked >= cut:
                break
    assert acked == cut
    responses.cancel()

    # Second stream: resume from the durable offset and finish.
    def resumed():
        yield pb.IngestRequest(open=pb.IngestRequest.Open(upload_id=upload_id, spec=spec("py-cust-1")))
        yield from data_msgs(recording, cut, len(recording))
        yield pb.IngestRequest(
            finish=pb.IngestRequest.Finish(
                expected_sha256=hashlib.sha256(recording).digest(), expected_size=len(recording)
            )
        )

    committed = None
    first = True
    for r in stub.Ingest(resumed()):
        kind = r.WhichOneof("msg")
        if first:
            assert kind == "opened" and r.opened.durable_offset == cut and r.opened.object_id == object_id
            first = False
        if kind == "committed":
            committed = r.committed
    assert committed is not None
    assert committed.object_id == object_id
    assert committed.size == len(recording)
    assert committed.sha256 == hashlib.sha256(recording).digest()
    assert committed.content_type == "audio/wav"

    # Whole object back, then a range across a segment boundary.
    whole = b"".join(m.data for m in stub.Get(pb.GetRequest(object_id=object_id, purpose=pb.QUALITY_REVIEW)))
    assert hashlib.sha256(whole).digest() == hashlib.sha256(recording).digest()
    start, end = 65536 - 100, 3 * 65536 + 7
    msgs = list(stub.Get(pb.GetRequest(object_id=object_id, range=pb.ByteRange(start=start, end=end), purpose=pb.QUALITY_REVIEW)))
    assert msgs[0].info.object_id == object_id
    assert b"".join(m.data for m in msgs) == recording[start : end + 1]

    # Stat and List agree.
    info = stub.Stat(pb.StatRequest(object_id=object_id))
    assert info.sha256 == committed.sha256
    listed = stub.List(pb.ListRequest(customer_id="py-cust-1"))
    assert [o.object_id for o in listed.objects] == [object_id]

    # No plaintext of the recording on disk.
    needle = recording[100000:100064]
    for dirpath, _, files in os.walk(data_dir):
        for f in files:
            assert needle not in Path(dirpath, f).read_bytes(), f"plaintext in {f}"


def test_errors_carry_grpc_status_codes(server):
    stub, _, _ = server
    with pytest.raises(grpc.RpcError) as e:
        stub.Stat(pb.StatRequest(object_id="nope"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.Stat(pb.StatRequest(object_id=str(uuid.uuid4())))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    def data_first():
        yield pb.IngestRequest(data=pb.IngestRequest.Data(offset=0, data=b"RIFF"))

    with pytest.raises(grpc.RpcError) as e:
        list(stub.Ingest(data_first()))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    put = stub.Put(
        pb.PutRequest(
            upload_id=str(uuid.uuid4()),
            spec=pb.ObjectSpec(customer_id="py-cust-2", kind=pb.CHAT_TRANSCRIPT, content_type="application/json"),
            data=b'{"messages": [{"from": "customer", "text": "hi"}]}',
        )
    )
    # Default config: a 7-day grace window. The shred is pending, content
    # locked; cancelling restores it.
    status = stub.ShredCustomer(
        pb.ShredCustomerRequest(customer_id="py-cust-2", reason="interop test", requested_by="pytest")
    )
    assert status.state == pb.PENDING_SHRED
    assert status.destroy_after.seconds - status.requested_at.seconds == 7 * 86400
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Get(pb.GetRequest(object_id=put.object.object_id, purpose=pb.QUALITY_REVIEW)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pending shred" in e.value.details()
    assert stub.CancelShred(pb.CancelShredRequest(customer_id="py-cust-2")).state == pb.ACTIVE
    back = b"".join(r.data for r in stub.Get(pb.GetRequest(object_id=put.object.object_id, purpose=pb.QUALITY_REVIEW)))
    assert back == b'{"messages": [{"from": "customer", "text": "hi"}]}'
    info = stub.Stat(pb.StatRequest(object_id=put.object.object_id))
    assert info.retention_policy == "chat-transcripts"
    assert info.expires_at.seconds - info.created_at.seconds == 365 * 86400

    # The audit trail, read by a client that is not ours: the read above
    # carries its purpose and the request id sent as metadata.
    b"".join(
        r.data
        for r in stub.Get(
            pb.GetRequest(object_id=put.object.object_id, purpose=pb.LEGAL),
            metadata=[("x-request-id", "py-req-1")],
        )
    )
    trail = stub.ListAuditRecords(pb.ListAuditRecordsRequest(customer_id="py-cust-2", action="object.read"))
    newest = trail.records[0]
    assert (newest.purpose, newest.request_id, newest.result) == ("legal", "py-req-1", "ok")
    actions = {r.action for r in stub.ListAuditRecords(pb.ListAuditRecordsRequest(customer_id="py-cust-2")).records}
    assert {"object.commit", "shred.request", "shred.cancel"} <= actions
    assert int(trail.head.split(":")[0]) >= newest.seq


def test_calls_without_credentials_are_refused(server):
    """No request is served without an identity; a bad token is refused."""
    _, _, channel = server
    anonymous = rpc.RecvaultStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        anonymous.List(pb.ListRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    forged = rpc.RecvaultStub(grpc.intercept_channel(channel, BearerToken("rvt_" + "0" * 32 + "_" + "1" * 64)))
    with pytest.raises(grpc.RpcError) as e:
        forged.WhoAmI(pb.WhoAmIRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "1" * 64 not in e.value.details()


def test_playback_link_serves_http_ranges(server, recording):
    """A link issued over gRPC (grpcio) is fetched with Python's own HTTP
    client: Range gives 206 with the exact bytes, a changed link is refused."""
    import urllib.error
    import urllib.request

    stub, _, _ = server
    put = stub.Put(
        pb.PutRequest(upload_id=str(uuid.uuid4()), spec=spec("py-cust-link"), data=recording[: 1 << 20])
    )
    body = recording[: 1 << 20]
    link = stub.CreatePlaybackLink(
        pb.CreatePlaybackLinkRequest(object_id=put.object.object_id, purpose=pb.QUALITY_REVIEW)
    )
    assert link.url.endswith(link.path) and link.path.startswith("/play/")
    req = urllib.request.Request(link.url, headers={"Range": "bytes=1000-70999"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-70999/{len(body)}"
        assert r.read() == body[1000:71000]
    with urllib.request.urlopen(link.url, timeout=10) as r:
        assert r.status == 200 and r.read() == body
    forged = link.url[:-3] + ("AAA" if not link.url.endswith("AAA") else "BBB")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403
