//! TLS termination on published ports (`-p HOST:GUEST/tls --tls-cert CERT
//! --tls-key KEY`): the host end speaks TLS (rustls, no OpenSSL) and the guest
//! port gets the plaintext, so a guest that serves plain HTTP is reached over
//! HTTPS.
//!
//! A terminated connection is one `rustls::ServerConnection` shared by the two
//! copy directions under a lock; each direction blocks on its own socket
//! outside the lock. TLS records are written to the client under the lock,
//! in the order the session made them.

use std::path::Path;
#[cfg(not(target_os = "macos"))]
use std::sync::Arc;

use crate::Error;

/// A server certificate chain and its key, checked to match.
#[derive(Clone)]
pub struct TlsConfig(#[cfg(not(target_os = "macos"))] Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

impl TlsConfig {
    /// Reads a PEM certificate chain (the server's certificate first) and a
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), and checks that the key is
    /// the certificate's.
    #[cfg(not(target_os = "macos"))]
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: String| Error::Tls(what);
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                bad(format!(
                    "cannot read the certificate {}: {e}",
                    cert.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(bad(format!("{} holds no PEM certificate", cert.display())));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            bad(format!(
                "cannot read the private key {}: {e}",
                key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| {
                bad(format!(
                    "the key {} does not fit the certificate {}: {e}",
                    key.display(),
                    cert.display()
                ))
            })?;
        Ok(Self(Arc::new(config)))
    }

    /// TLS termination needs rustls with ring, which this macOS build lacks.
    #[cfg(target_os = "macos")]
    pub fn load(_cert: &Path, _key: &Path) -> Result<Self, Error> {
        Err(Error::Tls(
            "TLS termination is not available in macOS builds yet".into(),
        ))
    }
}

/// Carries the TLS client `tcp` to the guest connection `guest` and back:
/// the handshake, then plaintext to the guest and TLS records to the client,
/// half-closes passed on (a client's `close_notify` or end of stream closes
/// the guest's write side; the guest's end sends `close_notify`).
#[cfg(not(target_os = "macos"))]
pub(crate) fn splice(
    cfg: &TlsConfig,
    tcp: std::net::TcpStream,
    early: &[u8],
    guest: std::os::unix::net::UnixStream,
) {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::sync::Mutex;
    let Ok(mut session) = rustls::ServerConnection::new(cfg.0.clone()) else {
        return;
    };
    let mut tcp = tcp;
    // The handshake, bounded: a client that never finishes it costs a thread
    // for at most this long.
    let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    while session.is_handshaking() {
        if let Err(e) = session.complete_io(&mut tcp) {
            tracing::debug!("TLS handshake: {e}");
            return;
        }
    }
    let _ = tcp.set_read_timeout(None);
    // What the guest said before the client did (a server that speaks
    // first) goes out first.
    if !early.is_empty()
        && (session.writer().write_all(early).is_err() || session.complete_io(&mut tcp).is_err())
    {
        return;
    }
    let (Ok(mut tcp_in), Ok(tcp_out), Ok(mut guest_in)) =
        (tcp.try_clone(), tcp.try_clone(), guest.try_clone())
    else {
        return;
    };
    // Lock order: the session, then the client's write side.
    let session = Arc::new(Mutex::new(session));
    let tcp_out = Arc::new(Mutex::new(tcp_out));
    let mut guest_out = guest;
    let (up_session, up_tcp) = (session.clone(), tcp_out.clone());
    // Client -> guest: TLS in, plaintext out; each socket is waited on
    // outside the session's lock.
    let up = std::thread::Builder::new()
        .name("sm-tls-up".into())
        .stack_size(256 << 10)
        .spawn(move || {
            let mut raw = vec![0u8; 32 * 1024];
            let mut plain = vec![0u8; 32 * 1024];
            let clean = loop {
                let n = match tcp_in.read(&mut raw) {
                    // The client's end of stream: its half-close.
                    Ok(0) => break true,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                };
                let Ok(mut s) = up_session.lock() else {
                    break false;
                };
                let mut out = Vec::new();
                let mut input = &raw[..n];
                let mut closed = false;
                let mut broken = false;
                while !input.is_empty() && !closed && !broken {
                    broken = s.read_tls(&mut input).is_err() || s.process_new_packets().is_err();
                    loop {
                        match s.reader().read(&mut plain) {
                            Ok(0) => {
                                // close_notify
                                closed = true;
                                break;
                            }
                            Ok(k) => out.extend_from_slice(&plain[..k]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                }
                // Alerts and session tickets the reading made.
                if flush(s, &up_tcp).is_err() || broken {
                    break false;
                }
                if !out.is_empty() && guest_out.write_all(&out).is_err() {
                    break false;
                }
                if closed {
                    break true;
                }
            };
            let _ = guest_out.shutdown(if clean {
                Shutdown::Write
            } else {
                Shutdown::Both
            });
        });
    let Ok(up) = up else {
        return;
    };
    // Guest -> client: plaintext in, TLS out.
    let mut buf = vec![0u8; 32 * 1024];
    let clean = loop {
        let n = match guest_in.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        };
        let Ok(mut s) = session.lock() else {
            break false;
        };
        if s.writer().write_all(&buf[..n]).is_err() || flush(s, &tcp_out).is_err() {
            break false;
        }
    };
    if let Ok(mut s) = session.lock() {
        if clean {
            s.send_close_notify();
            let _ = flush(s, &tcp_out);
        }
    }
    let _ = tcp.shutdown(if clean {
        Shutdown::Write
    } else {
        Shutdown::Both
    });
    let _ = up.join();
}

/// Writes the TLS records `s` has ready to the client: taken under the
/// session's lock, written under the write side's lock only, so the records
/// leave in the order the session made them and a slow client holds up no
/// reading of its requests.
#[cfg(not(target_os = "macos"))]
fn flush(
    mut s: std::sync::MutexGuard<'_, rustls::ServerConnection>,
    out: &std::sync::Mutex<std::net::TcpStream>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut bytes)?;
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let mut tcp = out
        .lock()
        .map_err(|_| std::io::Error::other("a TLS writer panicked"))?;
    drop(s);
    tcp.write_all(&bytes)
}

/// macOS builds have no TLS termination: [`TlsConfig::load`] refuses, so no
/// port ever asks for it.
#[cfg(target_os = "macos")]
pub(crate) fn splice(
    _cfg: &TlsConfig,
    _tcp: std::net::TcpStream,
    _early: &[u8],
    _guest: std::os::unix::net::UnixStream,
) {
}

#[cfg(all(test, not(target_os = "macos")))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A certificate for `localhost` and a client config that trusts it.
    fn pair(dir: &Path) -> (TlsConfig, Arc<rustls::ClientConfig>) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        (TlsConfig::load(&cert, &key).unwrap(), Arc::new(client))
    }

    #[test]
    fn a_terminated_connection_carries_bytes_both_ways_and_passes_half_closes_on() {
        let dir = std::env::temp_dir().join(format!("sm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, client_cfg) = pair(&dir);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (guest, mut guest_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let terminator = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            splice(&server, tcp, b"banner\n", guest);
        });
        // The "guest": echoes what arrives (plaintext) until the client's
        // half-close, then sends 8 MiB and closes.
        let guest = std::thread::spawn(move || {
            let mut got = Vec::new();
            guest_peer.read_to_end(&mut got).unwrap();
            guest_peer.write_all(&got).unwrap();
            let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
            guest_peer.write_all(&big).unwrap();
            got
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(client_cfg, name).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8).collect();
        tls.write_all(&request).unwrap();
        // The client's close_notify is the guest's end of stream.
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let mut back = Vec::new();
        tls.read_to_end(&mut back).unwrap();
        let sent = guest.join().unwrap();
        terminator.join().unwrap();
        assert_eq!(sent.len(), request.len());
        assert!(
            sent == request,
            "the guest got other plaintext than was sent"
        );
        let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut want = b"banner\n".to_vec();
        want.extend_from_slice(&request);
        want.extend_from_slice(&big);
        assert_eq!(back.len(), want.len());
        assert!(
            back == want,
            "the client got other bytes than the guest sent"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_that_is_not_tls_ends_without_reaching_the_guest() {
        let dir = std::env::temp_dir().join(format!("sm-tls-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, _) = pair(&dir);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (guest, mut guest_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let terminator = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            splice(&server, tcp, b"", guest);
        });
        let mut plain = std::net::TcpStream::connect(addr).unwrap();
        plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        terminator.join().unwrap();
        let mut got = Vec::new();
        guest_peer.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "plaintext reached the guest: {got:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
