//! TLS for the TCP transport (`tls = on`): rustls (TLS 1.2 and 1.3, the ring provider), and
//! both ends present a certificate. Each verifies the other's against a CA (`tls_ca`; the node
//! that dials also checks the name, `tls_server_name`, by default the host of `peer`) or
//! against a pinned SHA-256 fingerprint of the certificate itself (`tls_peer_fingerprint`).

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

use super::TransportError;
use crate::config::{TlsSettings, TlsVerify};
use crate::error::ConfigError;

/// A certificate's SHA-256 fingerprint as `tls_peer_fingerprint` spells it (hex, colons
/// between bytes), for logs and for operators pinning it.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A TLS error as a person reads it (rustls shows an application's own certificate error by
/// its debug form).
pub fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
            format!("invalid peer certificate: {}", o.0)
        }
        e => e.to_string(),
    }
}

/// The SHA-256 fingerprint of the first certificate in a PEM file.
pub fn fingerprint_of_file(path: &Path) -> Result<String, ConfigError> {
    let certs = load_certs("tls_cert", path)?;
    Ok(fingerprint(&certs[0]))
}

/// The node's TLS configuration, built once at open.
pub struct TlsContext {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn bad(key: &str, path: &Path, why: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        value: path.display().to_string(),
        why: why.into(),
    }
}

fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(key, path, format!("cannot read it: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(key, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(key, path, "holds no certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    super::auth::check_private("tls_key", path)?;
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| bad("tls_key", path, format!("not a PEM private key: {e}")))
}

impl TlsContext {
    /// Reads the certificate, key and CA (or takes the pinned fingerprint); every problem is
    /// an error naming its key.
    pub fn new(s: &TlsSettings) -> Result<Self, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = load_certs("tls_cert", &s.cert)?;
        let key = load_key(&s.key)?;
        let tls_err = |key: &str, path: &Path| {
            let (key, path) = (key.to_string(), path.to_path_buf());
            move |e: rustls::Error| bad(&key, &path, e.to_string())
        };
        let versions = |_| ConfigError::BadValue {
            key: "tls".into(),
            value: "on".into(),
            why: "the TLS provider supports no protocol version".into(),
        };
        let (server_verifier, client_verifier): (
            Arc<dyn ServerCertVerifier>,
            Arc<dyn ClientCertVerifier>,
        ) = match &s.verify {
            TlsVerify::Ca(ca) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs("tls_ca", ca)? {
                    roots.add(c).map_err(|e| {
                        bad("tls_ca", ca, format!("not a usable CA certificate: {e}"))
                    })?;
                }
                let roots = Arc::new(roots);
                let server = WebPkiServerVerifier::builder_with_provider(
                    Arc::clone(&roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| bad("tls_ca", ca, e.to_string()))?;
                let client =
                    WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|e| bad("tls_ca", ca, e.to_string()))?;
                (server, client)
            }
            TlsVerify::Fingerprint(fp) => {
                let pinned = Arc::new(Pinned {
                    fingerprint: *fp,
                    algorithms: provider.signature_verification_algorithms,
                });
                (Arc::clone(&pinned) as Arc<dyn ServerCertVerifier>, pinned)
            }
        };
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(versions)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(tls_err("tls_key", &s.key))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(versions)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs, key)
            .map_err(tls_err("tls_key", &s.key))?;
        // No resumption between the two nodes: every connection is a full handshake, and the
        // server sends nothing the client did not ask for after it.
        server.send_tls13_tickets = 0;
        let name = s.server_name.clone();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| ConfigError::BadValue {
                key: "tls_server_name".into(),
                value: name,
                why: e.to_string(),
            })?;
        Ok(TlsContext {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
        })
    }

    /// A TLS session for a connection this node dialed (it is the TLS client).
    pub fn client(&self) -> Result<rustls::Connection, TransportError> {
        rustls::ClientConnection::new(Arc::clone(&self.client), self.server_name.clone())
            .map(rustls::Connection::Client)
            .map_err(TransportError::Tls)
    }

    /// A TLS session for a connection this node accepted (it is the TLS server).
    pub fn server(&self) -> Result<rustls::Connection, TransportError> {
        rustls::ServerConnection::new(Arc::clone(&self.server))
            .map(rustls::Connection::Server)
            .map_err(TransportError::Tls)
    }
}

/// Moves a TLS handshake on as far as the socket allows; returns whether it is complete. A
/// failure sends TLS's alert to the peer first (best effort).
pub fn handshake(
    tls: &mut rustls::Connection,
    stream: &mut TcpStream,
) -> Result<bool, TransportError> {
    loop {
        while tls.wants_write() {
            match tls.write_tls(stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(TransportError::Io {
                        context: "TLS handshake",
                        source: e,
                    })
                }
            }
        }
        if !tls.is_handshaking() {
            return Ok(true);
        }
        match read_records(tls, stream) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(TransportError::Closed) => {
                return Err(TransportError::Io {
                    context: "TLS handshake",
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the TLS records the socket has into the session and processes them: `Ok(true)` when
/// some arrived, `Ok(false)` when none is ready, `Closed` when the peer closed. A record that
/// fails (a bad certificate, bytes that do not decrypt) sends TLS's alert first, best effort.
pub fn read_records(
    tls: &mut rustls::Connection,
    stream: &mut TcpStream,
) -> Result<bool, TransportError> {
    loop {
        match tls.read_tls(stream) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(_) => {
                if let Err(e) = tls.process_new_packets() {
                    let _ = tls.write_tls(stream);
                    return Err(TransportError::Tls(e));
                }
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(TransportError::Io {
                    context: "receiving from peer",
                    source: e,
                })
            }
        }
    }
}

/// A TLS session and its socket as one non-blocking byte stream (reads decrypt, writes
/// encrypt and send what the socket takes; the rest stays in the session for the next flush).
pub struct TlsIo<'a> {
    /// The session.
    pub tls: &'a mut rustls::Connection,
    /// Its socket.
    pub sock: &'a mut TcpStream,
}

impl io::Read for TlsIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            match read_records(self.tls, self.sock) {
                Ok(true) => {}
                Ok(false) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(TransportError::Closed) => return Ok(0),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

impl io::Write for TlsIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        self.flush_some();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_some();
        Ok(())
    }
}

impl TlsIo<'_> {
    /// Sends what the socket takes now (errors surface on the next read or write).
    fn flush_some(&mut self) {
        while self.tls.wants_write() {
            match self.tls.write_tls(self.sock) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Verifies the peer's certificate by its SHA-256 fingerprint (the certificate itself is the
/// trust anchor: no CA, no name, no validity dates), and its handshake signature.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let got: [u8; 32] = Sha256::digest(cert.as_ref()).into();
        if got == self.fingerprint {
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(FingerprintMismatch {
                got: fingerprint(cert.as_ref()),
            })),
        )))
    }
}

#[derive(Debug)]
struct FingerprintMismatch {
    got: String,
}

impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the peer's certificate has fingerprint {}, not the pinned tls_peer_fingerprint",
            self.got
        )
    }
}

impl std::error::Error for FingerprintMismatch {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    // The handshake signatures are checked as for a server certificate.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// Throwaway credentials for tests and `mirror bench`: a CA and one certificate per name it
/// signs (SANs: the name, `localhost` and 127.0.0.1), as PEM.
pub mod testing {
    /// A certificate and its private key, PEM.
    #[derive(Debug, Clone)]
    pub struct Issued {
        /// The certificate.
        pub cert_pem: String,
        /// Its private key.
        pub key_pem: String,
    }

    /// A throwaway CA.
    pub struct TestCa {
        /// The CA certificate, PEM.
        pub cert_pem: String,
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl TestCa {
        /// A new CA.
        pub fn new(name: &str) -> Result<Self, rcgen::Error> {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            Ok(TestCa {
                cert_pem: cert.pem(),
                cert,
                key,
            })
        }

        /// A certificate for `name` signed by this CA.
        pub fn issue(&self, name: &str) -> Result<Issued, rcgen::Error> {
            let mut params = rcgen::CertificateParams::new(vec![
                name.to_string(),
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.cert, &self.key)?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        }
    }
}
