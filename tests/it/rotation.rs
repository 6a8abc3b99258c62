//! Root-key rotation end to end: `recvault keys rotate-root` on a real data directory (file provider and SoftHSM2), killed mid-run and resumed.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use recvault::api::pb;

use crate::common::{ChildServer, Client, TestServer, get, ingest, jpeg, new_id, spec, wav};

/// Objects of several customers, with their plaintext.
async fn ingest_some(client: &mut Client, customers: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut stored = Vec::new();
    for (i, customer) in customers.iter().enumerate() {
        let audio = wav(30_000 + i * 1000);
        let info = ingest(client, &new_id(), spec(customer, pb::ContentKind::CallRecording, "audio/wav"), &audio).await;
        stored.push((info.object_id, audio));
        let image = jpeg(64, 48, 5000 + i);
        let info = ingest(client, &new_id(), spec(customer, pb::ContentKind::Image, "image/jpeg"), &image).await;
        stored.push((info.object_id, image));
    }
    stored
}

async fn read_back(client: &mut Client, stored: &[(String, Vec<u8>)]) {
    for (id, data) in stored {
        let back = get(client, id, None).await.unwrap_or_else(|e| panic!("object {id} unreadable: {e}"));
        assert!(back == *data, "object {id} differs after rotation");
    }
}

fn keys_cli(args: &[&str], data: &Path, envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recvault"))
        .arg("keys")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .envs(envs.iter().copied())
        .env_remove("RECVAULT_CONFIG")
        .output()
        .expect("run recvault keys")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "recvault keys failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Starts `keys rotate-root --batch-size 1` with the failpoint holding the
/// process after its second batch, waits for that batch's line, and kills
/// it with SIGKILL: a crash in the middle of a rotation.
fn rotate_and_kill(data: &Path, extra: &[&str], envs: &[(&str, &str)]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_recvault"))
        .args(["keys", "rotate-root", "--batch-size", "1", "--data-dir"])
        .arg(data)
        .args(extra)
        .envs(envs.iter().copied())
        .env("FAILPOINTS", "rotate-root-batch=1*off->sleep(600000)")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rotate-root");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let mut batches = 0;
    while batches < 2 {
        let line = lines.next().expect("rotate-root ended before its second batch").expect("utf-8");
        batches += usize::from(line.starts_with("batch done"));
        seen.push_str(&line);
        seen.push('\n');
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    seen
}

fn root_key_files(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("root."))
        .collect();
    names.sort();
    names
}

/// A4 with the file provider: kill -9 in the middle of a rotation, every
/// object still readable, the re-run finishes, root.key is retired only
/// then, and the server restarts on the new version alone.
#[tokio::test]
async fn a4_file_root_key_rotation_survives_kill_and_resumes() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let stored = ingest_some(&mut client, &["crm:rot-1", "crm:rot-2", "crm:rot-3"]).await;
    drop(client);
    let data = server.stop().await;
    let dir = data.path();
    let root_key_before = std::fs::read(dir.join("root.key")).unwrap();

    let seen = rotate_and_kill(dir, &[], &[]);
    assert!(seen.contains("batch done: 2 re-wrapped"), "{seen}");
    assert_eq!(root_key_files(dir), vec!["root.key", "root.v2.key"], "nothing retired mid-rotation");
    let status = ok(keys_cli(&["status"], dir, &[]));
    assert!(status.lines().count() == 2 && status.contains("v1") && status.contains("v2"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("v2") && l.contains("active")), "{status}");

    // Objects decrypt with either version while the rotation is half done.
    let server = TestServer::start_in(data, |_| {}).await;
    let mut client = server.client().await;
    read_back(&mut client, &stored).await;
    drop(client);
    let data = server.stop().await;
    let dir = data.path();

    let out = ok(keys_cli(&["rotate-root", "--batch-size", "2"], dir, &[]));
    assert!(out.contains("finished an interrupted rotation"), "{out}");
    // Both runs are in the audit trail: the killed one as begun only, the
    // second with its outcome; the chain still verifies offline.
    let db = rusqlite::Connection::open(dir.join("audit.sqlite")).unwrap();
    let mut q =
        db.prepare("SELECT principal, detail FROM records WHERE action = 'key.rotate_root' ORDER BY seq").unwrap();
    let rows: Vec<(String, String)> =
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(rows.len(), 3, "begun (killed), begun, finished: {rows:?}");
    assert!(rows.iter().all(|(who, _)| who.starts_with("local:")), "{rows:?}");
    assert!(rows[2].1.contains(r#""rewrapped":1"#), "{rows:?}");
    let public = std::fs::read_to_string(dir.join("signing.pub")).unwrap();
    let public = recvault::retention::certificate::parse_public_key(&public).unwrap();
    recvault::audit::verify(&dir.join("audit.sqlite"), &public).unwrap();
    assert!(out.contains("1 customer key(s) re-wrapped"), "{out}");
    assert!(out.contains("retired v1 file:"), "{out}");
    assert_eq!(root_key_files(dir), vec!["root.v2.key"]);
    let status = ok(keys_cli(&["status"], dir, &[]));
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(status.contains("3 customer key(s)"), "{status}");
    // The old key's bytes are gone from the data directory.
    let key_bytes = &root_key_before[24..];
    assert!(crate::common::files_containing(dir, key_bytes).is_empty(), "retired key material survives");

    // Restart on the new version alone: old and new content readable.
    let server = TestServer::start_in(data, |_| {}).await;
    let mut client = server.client().await;
    read_back(&mut client, &stored).await;
    let more = ingest_some(&mut client, &["crm:rot-4"]).await;
    read_back(&mut client, &more).await;
    drop(client);
    let data = server.stop().await;
    let status = ok(keys_cli(&["status"], data.path(), &[]));
    assert!(status.contains("4 customer key(s)"), "{status}");
    // Running it again rotates to a third version.
    let out = ok(keys_cli(&["rotate-root"], data.path(), &[]));
    assert!(out.contains("(new version): 4 customer key(s) re-wrapped") && out.contains("retired v2"), "{out}");
    let server = TestServer::start_in(data, |_| {}).await;
    let mut client = server.client().await;
    read_back(&mut client, &stored).await;
    read_back(&mut client, &more).await;
}

#[test]
fn rotate_root_refuses_a_zero_batch_and_a_missing_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let out = keys_cli(&["rotate-root", "--batch-size", "0"], dir.path(), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch-size must be at least 1"));
    let out = keys_cli(&["status"], &dir.path().join("absent"), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no data directory"), "{out:?}");
}

const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// A fresh SoftHSM2 token in a temporary directory: (dir, module, conf).
fn softhsm_token() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    let module = SOFTHSM_MODULES.iter().map(PathBuf::from).find(|p| p.exists());
    let util = Command::new("softhsm2-util").arg("--version").output().is_ok_and(|o| o.status.success());
    let Some(module) = module.filter(|_| util) else {
        if std::env::var("RECVAULT_SKIP_HSM").as_deref() == Ok("1") {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPING the PKCS#11 rotation test (RECVAULT_SKIP_HSM=1) !!!!!!!!\n"
            );
            return None;
        }
        panic!("the PKCS#11 rotation test needs SoftHSM2: apt-get install softhsm2, or set RECVAULT_SKIP_HSM=1");
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().join("tokens").display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "recvault-rot", "--pin", "1234", "--so-pin", "5678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pin = dir.path().join("user.pin");
    std::fs::write(&pin, "1234\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some((dir, module, conf))
}

/// The same round trip with the root key in a PKCS#11 token (SoftHSM2):
/// the new version is generated in the token, the old token key destroyed
/// at a zero count, and the server restarts on the new one.
#[tokio::test]
async fn a4_pkcs11_root_key_rotation_in_softhsm() {
    let Some((token_dir, module, conf)) = softhsm_token() else { return };
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "{}[root_key]\nprovider = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"recvault-rot\"\npin_file = \"{}\"\n\
         key_label = \"root\"\ncreate_key = true\n",
        crate::common::CHILD_CONFIG,
        module.display(),
        token_dir.path().join("user.pin").display()
    );
    let conf = conf.to_str().unwrap().to_owned();
    let envs = [("SOFTHSM2_CONF", conf.as_str())];
    let mut server = ChildServer::spawn_with(data.path(), &config, &envs, None);
    let mut client = server.client().await;
    let stored = ingest_some(&mut client, &["crm:hsm-1", "crm:hsm-2", "crm:hsm-3"]).await;
    drop(client);
    server.kill9();
    assert!(!data.path().join("root.key").exists(), "no key file with the pkcs11 provider");
    let config_path = data.path().join("test-config.toml");
    let config_arg = ["--config", config_path.to_str().unwrap()];

    let seen = rotate_and_kill(data.path(), &config_arg, &envs);
    assert!(seen.contains("batch done: 2 re-wrapped"), "{seen}");
    let mut args = vec!["status"];
    args.extend(config_arg);
    let status = ok(keys_cli(&args, data.path(), &envs));
    assert!(status.contains("key \"root\"") && status.contains("key \"root.v2\""), "{status}");

    // Half done: a restarted server reads everything.
    let mut server = ChildServer::spawn_with(data.path(), &config, &envs, None);
    let mut client = server.client().await;
    read_back(&mut client, &stored).await;
    drop(client);
    server.kill9();

    let mut args = vec!["rotate-root"];
    args.extend(config_arg);
    let out = ok(keys_cli(&args, data.path(), &envs));
    assert!(out.contains("retired v1 pkcs11:recvault-rot/root#"), "{out}");
    let mut args = vec!["status"];
    args.extend(config_arg);
    let status = ok(keys_cli(&args, data.path(), &envs));
    assert_eq!(status.lines().count(), 1, "the token key of v1 is destroyed: {status}");
    assert!(status.contains("pkcs11:recvault-rot/root.v2#") && status.contains("3 customer key(s)"), "{status}");

    let server = ChildServer::spawn_with(data.path(), &config, &envs, None);
    let mut client = server.client().await;
    read_back(&mut client, &stored).await;
}
