//! The registry client against a real docker-registry: plain HTTP, TLS + htpasswd,
//! mutual TLS, and distribution's token (Bearer) auth with a token server.

mod common;

use common::{Auth, Pki, Proxy, Registry, RegistryOpts, Stall, TokenServer};
use obdoci::{Descriptor, Digest, Reference, MT_OCI_CONFIG, MT_OCI_LAYER_TAR, MT_OCI_MANIFEST};
use obdregistry::{self as registry, BlobSource, ClientOptions, Credentials, PushOutcome};
use std::io::Read;
use std::time::Duration;

fn opts() -> ClientOptions {
    ClientOptions {
        retries: 1,
        retry_delay: Duration::from_millis(50),
        ..Default::default()
    }
}

/// A pseudo-random payload (xorshift) so blobs are not trivially compressible.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The image config the tests push.
const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// Pushes [`CONFIG`] and returns its descriptor with the bytes of an OCI manifest of
/// it and `layer`.
fn manifest_over(repo: &registry::Repository, layer: &Descriptor) -> (Descriptor, Vec<u8>) {
    let cd = Descriptor::of_bytes(MT_OCI_CONFIG, CONFIG);
    repo.push_blob(&cd, BlobSource::Bytes(CONFIG), None, None)
        .unwrap();
    let m = serde_json::json!({"schemaVersion":2,"mediaType":MT_OCI_MANIFEST,"config":cd,"layers":[layer]});
    (cd, serde_json::to_vec(&m).unwrap())
}

/// Push a config + layer + manifest, read everything back, and check the tag.
fn roundtrip(repo: &registry::Repository, tag: &str) -> Digest {
    let layer = payload(3 << 20, 7);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    assert_eq!(
        repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
            .unwrap(),
        PushOutcome::Existed
    );
    let (cd, mb) = manifest_over(repo, &ld);
    let md = repo
        .put_manifest(&Reference::Tag(tag.into()), MT_OCI_MANIFEST, &mb)
        .unwrap();
    assert_eq!(md, Digest::of(&mb));
    let (desc, bytes) = repo.get_manifest(&Reference::Tag(tag.into())).unwrap();
    assert_eq!(bytes, mb);
    assert_eq!(desc.media_type, MT_OCI_MANIFEST);
    assert_eq!(desc.digest, md);
    let (_, bytes) = repo.get_manifest(&Reference::Digest(md.clone())).unwrap();
    assert_eq!(bytes, mb);
    let mut back = Vec::new();
    repo.open_blob(&ld).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, layer);
    assert_eq!(repo.read_blob(&cd, 1 << 20).unwrap(), CONFIG);
    md
}

#[test]
fn plain_http_push_pull_mount_chunked_and_errors() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let client = registry::Registry::new(&reg.host(), &o).unwrap();
    let repo = client.repository("test/a");
    let md = roundtrip(&repo, "v1");
    assert!(reg.tag_link_exists("test/a", "v1"));
    assert_eq!(
        repo.manifest_exists(&Reference::Tag("v1".into())).unwrap(),
        Some(Some(md))
    );

    // Unknown tag: a clear not-found error naming the registry and the manifest.
    let e = repo
        .get_manifest(&Reference::Tag("nope".into()))
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&reg.host()) && msg.contains("nope") && msg.contains("MANIFEST_UNKNOWN"),
        "{msg}"
    );

    // Cross-repository mount.
    let layer = payload(3 << 20, 7);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    let other = client.repository("test/b");
    assert!(!other.blob_exists(&ld.digest).unwrap());
    assert_eq!(
        other
            .push_blob(&ld, BlobSource::Bytes(&layer), Some("test/a"), None)
            .unwrap(),
        PushOutcome::Mounted
    );
    assert!(other.blob_exists(&ld.digest).unwrap());
    // Mount from a repo that lacks the blob falls back to an upload.
    let fresh = payload(1000, 99);
    let fd = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &fresh);
    assert_eq!(
        other
            .push_blob(&fd, BlobSource::Bytes(&fresh), Some("test/a"), None)
            .unwrap(),
        PushOutcome::Uploaded
    );

    // Chunked upload from a file, with progress.
    let co = ClientOptions {
        chunk_size: Some(1 << 20),
        ..o.clone()
    };
    let chunked = registry::Registry::new(&reg.host(), &co)
        .unwrap()
        .repository("test/c");
    let data = payload((5 << 20) + 123, 3);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, &data).unwrap();
    let dd = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = seen.clone();
    let prog: registry::ProgressFn = std::sync::Arc::new(move |n| {
        s2.store(n, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(
        chunked
            .push_blob(&dd, BlobSource::File(&f), None, Some(prog))
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );
    let mut back = Vec::new();
    chunked
        .open_blob(&dd)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);

    // Monolithic upload from a file (streamed in pieces), with progress to the end.
    let mono = client.repository("test/d");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = seen.clone();
    let prog: registry::ProgressFn = std::sync::Arc::new(move |n| {
        s2.store(n, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(
        mono.push_blob(&dd, BlobSource::File(&f), None, Some(prog))
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );
    let mut back = Vec::new();
    mono.open_blob(&dd).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    // A descriptor that does not match the content is rejected by the registry.
    let mut wrong = dd.clone();
    wrong.digest = Digest::of(b"something else");
    let e = client
        .repository("test/e")
        .push_blob(&wrong, BlobSource::File(&f), None, None)
        .unwrap_err();
    assert!(
        e.to_string().contains("DIGEST_INVALID") || e.to_string().contains("400"),
        "{e}"
    );

    // A corrupted blob in the registry's storage is caught while streaming.
    let p = reg.blob_data_path(dd.digest.as_str());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let mut sink = Vec::new();
    let e = chunked
        .open_blob(&dd)
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err();
    assert!(e.to_string().contains("digest mismatch"), "{e}");
}

#[test]
fn tls_htpasswd_and_client_certs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Htpasswd {
            user: "alice".into(),
            password: "s3cr:et".into(),
        },
    });
    let good = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: Credentials::parse("alice:s3cr:et"),
        ..opts()
    };
    let repo = registry::Registry::new(&reg.host(), &good)
        .unwrap()
        .repository("sec/x");
    roundtrip(&repo, "latest");

    // Wrong password: one clear authentication error, password not in the message.
    let bad = ClientOptions {
        credentials: Credentials::parse("alice:wrongpass"),
        ..good.clone()
    };
    let e = registry::Registry::new(&reg.host(), &bad)
        .unwrap()
        .repository("sec/x")
        .get_manifest(&Reference::Tag("latest".into()))
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, registry::Error::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains("authentication failed") && !msg.contains("wrongpass"),
        "{msg}"
    );

    // No credentials.
    let anon = ClientOptions {
        credentials: None,
        ..good.clone()
    };
    let e = registry::Registry::new(&reg.host(), &anon)
        .unwrap()
        .repository("sec/x")
        .blob_exists(&Digest::of(b"x"))
        .unwrap_err();
    assert!(e.to_string().contains("-u user:password"), "{e}");

    // Unknown CA: TLS verification fails; --insecure accepts it; --cert-dir supplies it.
    let no_ca = ClientOptions {
        root_cas: vec![],
        ..good.clone()
    };
    let e = registry::Registry::new(&reg.host(), &no_ca)
        .unwrap()
        .repository("sec/x")
        .blob_exists(&Digest::of(b"x"))
        .unwrap_err();
    assert!(matches!(e, registry::Error::Transport { .. }), "{e}");
    // Not retried (a certificate does not get better), with a hint.
    assert_eq!(e.kind(), obdoci::ErrorKind::Tls, "{e}");
    assert!(e.to_string().contains("--root-ca"), "{e}");
    let insecure = ClientOptions {
        insecure: true,
        ..no_ca.clone()
    };
    assert!(!registry::Registry::new(&reg.host(), &insecure)
        .unwrap()
        .repository("sec/x")
        .blob_exists(&Digest::of(b"x"))
        .unwrap());
    let certdir = dir.path().join("certs.d");
    std::fs::create_dir_all(&certdir).unwrap();
    std::fs::copy(pki.path("ca.crt"), certdir.join("ca.crt")).unwrap();
    let via_dir = ClientOptions {
        cert_dirs: vec![certdir],
        ..no_ca.clone()
    };
    assert!(!registry::Registry::new(&reg.host(), &via_dir)
        .unwrap()
        .repository("sec/x")
        .blob_exists(&Digest::of(b"x"))
        .unwrap());
    // A bad CA file is a clear setup error naming the file.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a cert").unwrap();
    let e = registry::Registry::new(
        &reg.host(),
        &ClientOptions {
            root_cas: vec![junk.clone()],
            ..good.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("junk.pem"), "{e}");
}

#[test]
fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: true,
        auth: Auth::None,
    });
    let base = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        ..opts()
    };
    let e = registry::Registry::new(&reg.host(), &base)
        .unwrap()
        .repository("m/x")
        .blob_exists(&Digest::of(b"x"))
        .unwrap_err();
    assert!(matches!(e, registry::Error::Transport { .. }), "{e}");
    let with_cert = ClientOptions {
        client_certs: vec![(pki.path("client.crt"), pki.path("client.key"))],
        ..base
    };
    let repo = registry::Registry::new(&reg.host(), &with_cert)
        .unwrap()
        .repository("m/x");
    roundtrip(&repo, "t");
}

#[test]
fn bearer_token_flow() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let ts = TokenServer::start(&pki, "bob", "hunter2");
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Token { realm: ts.realm() },
    });
    let good = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: Credentials::parse("bob:hunter2"),
        ..opts()
    };
    let client = registry::Registry::new(&reg.host(), &good).unwrap();
    roundtrip(&client.repository("tok/a"), "v1");
    let reqs = ts.requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|r| r.contains("scope=repository%3Atok%2Fa%3Apull%2Cpush")
                || r.contains("scope=repository:tok/a:pull,push")),
        "token requests: {reqs:?}"
    );
    assert!(
        reqs.iter().all(|r| r.contains("service=test-registry")),
        "{reqs:?}"
    );
    // Cross-repo mount asks for pull on the source repo too.
    let layer = payload(3 << 20, 7);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    assert_eq!(
        client
            .repository("tok/b")
            .push_blob(&ld, BlobSource::Bytes(&layer), Some("tok/a"), None)
            .unwrap(),
        PushOutcome::Mounted
    );
    // A file streamed to a repository whose token the client has not asked for yet: the
    // upload's first request is challenged, the PUT reuses the token.
    let f = dir.path().join("blob");
    let big = payload(5 << 20, 11);
    std::fs::write(&f, &big).unwrap();
    let fd = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &big);
    let repo = client.repository("tok/c");
    assert_eq!(
        repo.push_blob(&fd, BlobSource::File(&f), None, None)
            .unwrap(),
        PushOutcome::Uploaded
    );
    let mut back = Vec::new();
    repo.open_blob(&fd).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back, big);
    // Wrong credentials: the token server refuses them.
    let bad = ClientOptions {
        credentials: Credentials::parse("bob:nope"),
        ..good.clone()
    };
    let e = registry::Registry::new(&reg.host(), &bad)
        .unwrap()
        .repository("tok/a")
        .get_manifest(&Reference::Tag("v1".into()))
        .unwrap_err();
    assert!(matches!(e, registry::Error::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("rejected the credentials"), "{e}");
}

#[test]
fn broken_download_resumes_with_range() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let data = payload(3 << 20, 42);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    registry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository("r/x")
        .push_blob(&d, BlobSource::Bytes(&data), None, None)
        .unwrap();
    // The first response is cut after 1 MB; the reader must resume at the byte where
    // it broke and still verify the whole blob.
    let proxy = Proxy::start_with(reg.port, None, None, Some(1 << 20));
    let repo = registry::Registry::new(&format!("127.0.0.1:{}", proxy.port), &o)
        .unwrap()
        .repository("r/x");
    let mut back = Vec::new();
    repo.open_blob(&d).unwrap().read_to_end(&mut back).unwrap();
    assert!(proxy.was_cut(), "the first download was not cut");
    assert_eq!(back.len(), data.len());
    assert!(back == data);
}

/// A resume answered with the whole blob (a server or proxy that ignores
/// `Range`) skips what was read already instead of failing the download.
#[test]
fn broken_download_resumes_when_range_is_ignored() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let data = payload(3 << 20, 43);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    registry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository("r/y")
        .push_blob(&d, BlobSource::Bytes(&data), None, None)
        .unwrap();
    let proxy = Proxy::start_cut_ignoring_range(reg.port, 1 << 20);
    let repo = registry::Registry::new(&format!("127.0.0.1:{}", proxy.port), &o)
        .unwrap()
        .repository("r/y");
    let mut back = Vec::new();
    repo.open_blob(&d).unwrap().read_to_end(&mut back).unwrap();
    assert!(proxy.was_cut(), "the first download was not cut");
    assert!(back == data);
    // The whole blob came twice, less what the cut dropped.
    assert!(proxy.bytes_to_clients() > data.len() as u64 + (1 << 19));
}

/// A connection on which nothing moves fails after the stall timeout instead
/// of hanging: a download that stops resumes with a range request, an upload
/// the registry stops taking is restarted, and a request never answered is
/// retried, then fails naming the stall.
#[test]
fn stalled_connections_fail_after_the_stall_timeout() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        stall_timeout: Duration::from_secs(1),
        ..opts()
    };
    let data = payload(8 << 20, 43);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    let via = |p: &Proxy| {
        registry::Registry::new(&format!("127.0.0.1:{}", p.port), &o)
            .unwrap()
            .repository("r/stall")
    };

    // An upload the registry stops reading after 1 MB: restarted, then stored.
    let up = Proxy::start_stalling(reg.port, Stall::FromClient, 1 << 20);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        via(&up)
            .push_blob(&d, BlobSource::File(file.path()), None, None)
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert!(up.has_stalled(), "the upload did not stall");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // The same in 16 MiB chunks (--push-chunk-size), stalled inside the first
    // (each PATCH is a connection of its own): that PATCH fails after the stall
    // timeout too, not after the 10 minutes a registry gets to answer once it has
    // the body, and the upload is restarted. (The chunk must be larger than what
    // the sockets buffer, or the stall looks like a registry busy committing.)
    let up = Proxy::start_stalling(reg.port, Stall::FromClient, 1 << 20);
    let chunked = ClientOptions {
        chunk_size: Some(16 << 20),
        ..o.clone()
    };
    let big = payload(24 << 20, 44);
    let d2 = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &big);
    let file2 = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file2.path(), &big).unwrap();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = progress.clone();
    let report: registry::ProgressFn = std::sync::Arc::new(move |n| {
        seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
    });
    let t = std::time::Instant::now();
    assert_eq!(
        registry::Registry::new(&format!("127.0.0.1:{}", up.port), &chunked)
            .unwrap()
            .repository("r/stall")
            .push_blob(&d2, BlobSource::File(file2.path()), None, Some(report))
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert!(up.has_stalled(), "the chunked upload did not stall");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), d2.size);
    let mut back = Vec::new();
    via(&up)
        .open_blob(&d2)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == big);

    // A download that stops after 1 MB: resumed where it stopped, verified.
    let down = Proxy::start_stalling(reg.port, Stall::ToClient, 1 << 20);
    let mut back = Vec::new();
    via(&down)
        .open_blob(&d)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(down.has_stalled(), "the download did not stall");
    assert!(back == data);

    // A slow but steady download outlasts the deadline of its requests: it
    // goes on with new ones and never gives up.
    let slow = Proxy::start(reg.port, None, Some(3 << 20));
    let mut back = Vec::new();
    let t = std::time::Instant::now();
    via(&slow)
        .open_blob(&d)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(t.elapsed() > Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(back == data);

    // A server that accepts connections and never answers: every attempt
    // times out, then the request fails.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let t = std::time::Instant::now();
    let e = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("r/stall")
        .get_manifest(&Reference::Tag("latest".into()))
        .unwrap_err();
    let text = format!("{}", obdoci::error::Chain(&e));
    assert!(text.contains("timed out"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// A manifest put that finds a blob's link momentarily empty (what distribution's
/// filesystem storage shows while another client pushes the same blob: it rewrites
/// the link in place) is retried and succeeds; a blob that is really gone still
/// fails, naming the registry's error, once the retries are used.
#[test]
fn manifest_push_waits_for_a_blob_link_being_rewritten() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        retries: 3,
        retry_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let repo = registry::Registry::new(&reg.host(), &o)
        .unwrap()
        .repository("race/m");
    let layer = payload(1 << 16, 9);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
        .unwrap();
    let (_, mb) = manifest_over(&repo, &ld);

    // The link is empty now and written again 300 ms later.
    let link = reg.layer_link_path("race/m", ld.digest.as_str());
    let content = std::fs::read(&link).unwrap();
    assert_eq!(content, ld.digest.as_str().as_bytes());
    std::fs::write(&link, b"").unwrap();
    let restore = {
        let link = link.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&link, content).unwrap();
        })
    };
    let md = repo
        .put_manifest(&Reference::Tag("t".into()), MT_OCI_MANIFEST, &mb)
        .unwrap();
    restore.join().unwrap();
    assert_eq!(md, Digest::of(&mb));
    assert!(reg.tag_link_exists("race/m", "t"));

    // A blob the repository does not hold: the same error, after the retries.
    reg.delete_blob("race/m", ld.digest.as_str());
    let t0 = std::time::Instant::now();
    let e = repo
        .put_manifest(&Reference::Tag("u".into()), MT_OCI_MANIFEST, &mb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MANIFEST_BLOB_UNKNOWN"), "{e}");
    assert!(e.contains("push manifest race/m:u"), "{e}");
    assert!(
        t0.elapsed() >= Duration::from_millis(200 + 400 + 800),
        "gave up without retrying"
    );
    assert!(!reg.tag_link_exists("race/m", "u"));
}

/// A registry that takes longer than the stall timeout to answer an upload's
/// final PUT (it is committing the blob: hashing it, or copying it on slow
/// storage) is waited for. The stall timeout is for a body the registry stops
/// taking, and an empty body (the final PUT of a chunked upload, or an empty
/// blob's PUT) has nothing to take.
#[test]
fn a_slow_commit_is_not_a_stall() {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let commit = Duration::from_millis(2500);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let (method, target) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            std::io::Read::read_exact(&mut r, &mut body).unwrap();
            let loc = "Location: /v2/r/slow/blobs/uploads/u1\r\n";
            let head = match method.as_str() {
                "HEAD" => "404 Not Found\r\n".to_string(),
                "POST" | "PATCH" => format!("202 Accepted\r\n{loc}"),
                "PUT" => {
                    std::thread::sleep(commit);
                    let d = target.split("digest=").nth(1).unwrap_or("").to_string();
                    format!("201 Created\r\nDocker-Content-Digest: {d}\r\n")
                }
                _ => "400 Bad Request\r\n".to_string(),
            };
            let _ = write!(
                c,
                "HTTP/1.1 {head}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    let o = ClientOptions {
        plain_http: true,
        stall_timeout: Duration::from_secs(1),
        retries: 0,
        ..opts()
    };
    let host = format!("127.0.0.1:{port}");
    // Chunked: two PATCHes, then the empty final PUT.
    let data = payload(3 << 19, 5);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    let chunked = ClientOptions {
        chunk_size: Some(1 << 20),
        ..o.clone()
    };
    let repo = registry::Registry::new(&host, &chunked)
        .unwrap()
        .repository("r/slow");
    assert_eq!(
        repo.push_blob(&d, BlobSource::Bytes(&data), None, None)
            .unwrap(),
        PushOutcome::Uploaded
    );
    // An empty blob from a file: one streamed PUT with no body.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let e = Descriptor::of_bytes(MT_OCI_LAYER_TAR, b"");
    let repo = registry::Registry::new(&host, &o)
        .unwrap()
        .repository("r/slow");
    let t = std::time::Instant::now();
    assert_eq!(
        repo.push_blob(&e, BlobSource::File(empty.path()), None, None)
            .unwrap(),
        PushOutcome::Uploaded
    );
    assert!(t.elapsed() >= commit);
}

/// A server that answers every request with `206` and the `Content-Range`
/// `range` over `body` (whatever range was asked).
fn serve_partial(range: &'static str, body: Vec<u8>) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    // Skip the headers.
                    while {
                        line.clear();
                        r.read_line(&mut line).unwrap_or(0) > 0 && line.trim_end() != ""
                    } {}
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: {range}\r\n\
                         Content-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if w.write_all(head.as_bytes()).is_err() || w.write_all(&body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A `206` whose `Content-Range` is not the range asked for (a proxy or
/// server that answers another part of the blob) fails the read: its bytes
/// belong elsewhere and must not be taken for those asked.
#[test]
fn a_range_answered_with_other_bytes_fails_the_read() {
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, b"x").digest;
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    for (range, ok) in [
        ("bytes 4096-8191/100000", true),
        ("bytes 8192-12287/100000", false),
        ("bytes 0-4095/100000", false),
        ("bytes 4096-8191/*", true),
        ("bytes */100000", false),
        ("garbage", false),
    ] {
        let port = serve_partial(range, vec![7u8; 4096]);
        let repo = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
            .unwrap()
            .repository("r/range");
        let mut buf = vec![0u8; 4096];
        let r = repo.read_blob_range(&d, 4096, &mut buf, Some(Duration::from_secs(5)));
        match (ok, r) {
            (true, Ok(())) => assert!(buf.iter().all(|&b| b == 7)),
            (false, Err(e)) => {
                let line = obdoci::error::Chain(&e).to_string();
                assert!(line.contains("Content-Range"), "{range}: {line}");
                assert!(line.contains("4096-8191"), "{range}: {line}");
            }
            (_, r) => panic!("{range}: {r:?}"),
        }
    }
}

/// A TCP front for `upstream`: connection `i` (from 0) is answered with the
/// response head `answer(i)` gives, after its request head, and closed (a
/// token server or registry blip, a rate limit); the others are relayed.
/// Returns its port.
fn front(
    upstream: u16,
    mut answer: impl FnMut(usize) -> Option<&'static str> + Send + 'static,
) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(mut c) = c else { continue };
            if let Some(head) = answer(i) {
                let mut r = BufReader::new(c.try_clone().unwrap());
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                }
                let _ = write!(c, "{head}");
                continue;
            }
            let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut cr, mut sw) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut cr, &mut sw);
                let _ = sw.shutdown(std::net::Shutdown::Write);
            });
            let (mut sr, mut cw) = (s, c);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut sr, &mut cw);
                let _ = cw.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// A [`front`] whose connections numbered in `fail` are answered `503 Service
/// Unavailable`.
fn flaky_front(upstream: u16, fail: &'static [usize]) -> u16 {
    front(upstream, move |i| {
        fail.contains(&i).then_some(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
    })
}

/// A token server that fails a request now and then (503) is asked again, like
/// the registry itself: both when a challenge asks for a first token and when a
/// token for another scope is fetched ahead of a request. A failure of the
/// token request used to fail the request at once, without a retry.
#[test]
fn a_token_server_blip_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let ts = TokenServer::start(&pki, "bob", "hunter2");
    // Token requests 0 (the first challenge's) and 2 (the pull scope's, asked
    // for ahead of the manifest read) fail.
    let front = flaky_front(ts.port, &[0, 2]);
    let reg = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Token {
            realm: format!("http://127.0.0.1:{front}/token"),
        },
    });
    let o = ClientOptions {
        root_cas: vec![pki.path("ca.crt")],
        credentials: Credentials::parse("bob:hunter2"),
        ..opts()
    };
    let client = registry::Registry::new(&reg.host(), &o).unwrap();
    roundtrip(&client.repository("tok/blip"), "v1");
    let reqs = ts.requests.lock().unwrap().clone();
    assert!(reqs.len() >= 2, "token requests: {reqs:?}");

    // A token server that keeps failing still fails the request, naming it.
    let down = flaky_front(ts.port, &[0, 1, 2, 3]);
    let reg2 = Registry::start(RegistryOpts {
        tls: Some(&pki),
        client_ca: false,
        auth: Auth::Token {
            realm: format!("http://127.0.0.1:{down}/token"),
        },
    });
    let e = registry::Registry::new(&reg2.host(), &o)
        .unwrap()
        .repository("tok/blip")
        .get_manifest(&Reference::Tag("v1".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("token request") && e.contains("HTTP 503"), "{e}");
}

/// A manifest whose answer breaks off in its body is asked for again (the
/// request is retried when it fails before its answer; its body used to fail
/// the read at once).
#[test]
fn a_manifest_cut_in_its_body_is_read_again() {
    let reg = Registry::plain();
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let repo = reg.client("cut/m");
    let layer = payload(1 << 10, 3);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
        .unwrap();
    let cd = Descriptor::of_bytes(MT_OCI_CONFIG, CONFIG);
    repo.push_blob(&cd, BlobSource::Bytes(CONFIG), None, None)
        .unwrap();
    // 200 KB of annotations: the answer's body is read in many pieces.
    let m = serde_json::json!({"schemaVersion":2,"mediaType":MT_OCI_MANIFEST,"config":cd,
        "layers":[ld],"annotations":{"pad": "x".repeat(200 << 10)}});
    let mb = serde_json::to_vec(&m).unwrap();
    let md = repo
        .put_manifest(&Reference::Tag("t".into()), MT_OCI_MANIFEST, &mb)
        .unwrap();
    // The first answer is cut after 64 KB (its head and part of its body).
    let proxy = Proxy::start_with(reg.port, None, None, Some(64 << 10));
    let via = registry::Registry::new(&format!("127.0.0.1:{}", proxy.port), &o)
        .unwrap()
        .repository("cut/m");
    let (desc, bytes) = via.get_manifest(&Reference::Tag("t".into())).unwrap();
    assert!(proxy.was_cut(), "the answer was not cut");
    assert_eq!(desc.digest, md);
    assert!(bytes == mb);
}

/// A registry that answers 429 with `Retry-After` is asked again no sooner
/// than it said: the back-off's first delays (here 50 ms) came back too early,
/// were refused again, and the request failed with the retries unused.
#[test]
fn retry_after_is_waited_for() {
    let reg = Registry::plain();
    let repo = reg.client("slow/down");
    let layer = payload(1 << 10, 4);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
        .unwrap();
    // For 2 s after the first request, every request is answered 429
    // (Retry-After: 2); later ones are relayed.
    let mut first = None;
    let port = front(reg.port, move |_| {
        let t0 = *first.get_or_insert_with(std::time::Instant::now);
        (t0.elapsed() < Duration::from_secs(2)).then_some(
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
    });
    let o = ClientOptions {
        plain_http: true,
        retries: 2,
        ..opts()
    };
    let via = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("slow/down");
    let t = std::time::Instant::now();
    assert!(via.blob_exists(&ld.digest).unwrap());
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
}

/// A blob server for `data` at any `/blobs/` path: the first blob request is
/// answered by `first(request_range_start)` (status line and headers with the
/// blank line, then the body bytes it returns, then the connection is closed);
/// later ones are answered properly (200, or 206 with its `Content-Range` for
/// `Range: bytes=A-`, 416 past the end). Other paths get `200 {}`. Returns the
/// port and the ranges asked for, in order.
#[allow(clippy::type_complexity)]
fn serve_blob(
    data: Vec<u8>,
    first: impl Fn(&[u8]) -> (String, Vec<u8>) + Send + 'static,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Option<u64>>>>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut start = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        start = v.trim().trim_end_matches('-').parse::<u64>().ok();
                    }
                }
                if !path.contains("/blobs/") {
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
                    continue;
                }
                let n = {
                    let mut a = seen.lock().unwrap();
                    a.push(start);
                    a.len()
                };
                if n == 1 {
                    let (head, body) = first(&data);
                    let _ = w.write_all(head.as_bytes());
                    let _ = w.write_all(&body);
                    break;
                }
                let from = start.unwrap_or(0) as usize;
                let ok = if from >= data.len() && start.is_some() {
                    w.write_all(
                        format!(
                            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\n\r\n",
                            data.len()
                        )
                        .as_bytes(),
                    )
                } else if start.is_some() {
                    w.write_all(
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                            data.len() - 1,
                            data.len(),
                            data.len() - from
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| w.write_all(&data[from..]))
                } else {
                    w.write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len())
                            .as_bytes(),
                    )
                    .and_then(|_| w.write_all(&data))
                };
                if ok.is_err() {
                    break;
                }
            }
        }
    });
    (port, asked)
}

/// A download whose answer ends cleanly but early (a close-delimited body, as
/// a proxy without `Content-Length` sends, closed after part of the blob) is
/// resumed where it ended, as a broken one is; it used to fail the size check.
#[test]
fn a_body_that_ends_early_is_resumed() {
    let data = payload(300 << 10, 44);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    let (port, asked) = serve_blob(data.clone(), |data| {
        (
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
            data[..100 << 10].to_vec(),
        )
    });
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let repo = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("r/short");
    let mut back = Vec::new();
    repo.open_blob(&d).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == data);
    assert_eq!(*asked.lock().unwrap(), vec![None, Some(100 << 10)]);
}

/// A download that breaks after its last byte (a chunked answer whose end
/// never comes) is not resumed at the blob's end, which a registry answers
/// with 416: every byte is there and the digest decides.
#[test]
fn a_download_broken_after_its_last_byte_is_complete() {
    let data = payload(300 << 10, 46);
    let d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    let (port, asked) = serve_blob(data.clone(), |data| {
        let mut body = format!("{:x}\r\n", data.len()).into_bytes();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            body,
        )
    });
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let repo = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("r/end");
    let mut back = Vec::new();
    repo.open_blob(&d).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == data);
    assert_eq!(*asked.lock().unwrap(), vec![None]);
}

/// A blob shorter than its descriptor says, served whole with its `Content-Length`
/// (a manifest giving a layer the wrong size): the answer ended where the server said
/// it ends, so it is not resumed (a resume past the blob's end is answered 416); the
/// size check names the sizes.
#[test]
fn a_blob_shorter_than_its_descriptor_fails_the_size_check() {
    let data = payload(100 << 10, 47);
    let mut d = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &data);
    d.size += 512;
    let (port, asked) = serve_blob(data.clone(), |data| {
        (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len()),
            data.to_vec(),
        )
    });
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let repo = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("r/wrong");
    let mut back = Vec::new();
    let e = repo
        .open_blob(&d)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    let msg = obdoci::error::Chain(&e).to_string();
    assert!(
        msg.contains(&d.size.to_string()) && msg.contains(&data.len().to_string()),
        "{msg}"
    );
    assert_eq!(*asked.lock().unwrap(), vec![None]);
}

/// A `HEAD` of a blob answered with `Content-Length: 0` (some proxies and CDNs
/// answer every `HEAD` so) gives no size, unless the blob is the empty one: dedup
/// deletes a row whose blob has another size than the row's.
#[test]
fn a_head_answered_with_length_0_gives_no_size() {
    let reg = Registry::plain();
    let repo = reg.client("head/zero");
    let layer = payload(1 << 10, 5);
    let ld = Descriptor::of_bytes(MT_OCI_LAYER_TAR, &layer);
    repo.push_blob(&ld, BlobSource::Bytes(&layer), None, None)
        .unwrap();
    let empty = Descriptor::of_bytes(MT_OCI_LAYER_TAR, b"");
    repo.push_blob(&empty, BlobSource::Bytes(b""), None, None)
        .unwrap();
    assert_eq!(
        repo.blob_stat(&ld.digest).unwrap(),
        registry::BlobStat::Present { size: Some(1024) }
    );
    let port = front(reg.port, |_| {
        Some("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    });
    let o = ClientOptions {
        plain_http: true,
        ..opts()
    };
    let via = registry::Registry::new(&format!("127.0.0.1:{port}"), &o)
        .unwrap()
        .repository("head/zero");
    assert_eq!(
        via.blob_stat(&ld.digest).unwrap(),
        registry::BlobStat::Present { size: None }
    );
    assert_eq!(
        via.blob_stat(&empty.digest).unwrap(),
        registry::BlobStat::Present { size: Some(0) }
    );
    // The lazy reader's size of a blob (its descriptor gave none): the same HEAD, where
    // no size is an error, not a blob of 0 bytes whose every read would end at once.
    assert_eq!(repo.blob_size(&ld.digest).unwrap(), 1024);
    let e = via.blob_size(&ld.digest).unwrap_err();
    assert!(matches!(e, registry::Error::Protocol { .. }), "{e:?}");
    assert_eq!(via.blob_size(&empty.digest).unwrap(), 0);
    let missing = Digest::of(b"not pushed");
    let e = repo.blob_size(&missing).unwrap_err();
    assert!(matches!(e, registry::Error::NotFound { .. }), "{e:?}");
    assert_eq!(
        repo.blob_stat(&missing).unwrap(),
        registry::BlobStat::Missing
    );
}

/// A registry whose API is not at `/v2` (hosts.toml: a server URL with a path) is
/// asked for a blob's size and ranges of it there, as for everything else.
#[test]
fn blob_heads_and_ranges_use_the_configured_api_path() {
    use std::io::{BufRead, BufReader, Write};
    let data = payload(1000, 9);
    let d = Digest::of(&data);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let blob_path = format!("/prefix/v2/r/blobs/{d}");
    let served = data.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { break };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let mut range = None;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                }
            }
            let _ = match (path == blob_path, method, range) {
                (true, "HEAD", _) => write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    served.len()
                ),
                (true, "GET", Some((a, b))) => write!(
                    w,
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    served.len(),
                    b + 1 - a
                )
                .and_then(|()| w.write_all(&served[a..=b])),
                _ => w.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    let hosts = tempfile::tempdir().unwrap();
    let hdir = hosts.path().join("registry.example");
    std::fs::create_dir_all(&hdir).unwrap();
    std::fs::write(
        hdir.join("hosts.toml"),
        format!("server = \"http://127.0.0.1:{port}/prefix\"\n"),
    )
    .unwrap();
    let o = ClientOptions {
        hosts_dir: Some(hosts.path().to_path_buf()),
        ..opts()
    };
    let repo = registry::Registry::new("registry.example", &o)
        .unwrap()
        .repository("r");
    assert_eq!(repo.blob_size(&d).unwrap(), 1000);
    let mut buf = vec![0u8; 100];
    repo.read_blob_range(&d, 200, &mut buf, None).unwrap();
    assert_eq!(buf, data[200..300]);
}
