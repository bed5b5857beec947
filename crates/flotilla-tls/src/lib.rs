//! The host agents' TLS identity. Each agent makes a self-signed
//! certificate on its first start (`<data>/tls/agent.crt`, its key beside
//! it, readable by root only) and serves its API over HTTPS with it.
//! Clients trust exactly that certificate, named by its SHA-256
//! fingerprint ("pinning"), which they learn over a channel they already
//! trust: the data directory for the local CLI, the agent's heartbeats
//! (with a host token) for the control plane, the migration request for a
//! source agent. No certificate authority, nothing to renew: an agent
//! keeps its certificate for as long as its data directory lives.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The certificate's file in the identity's directory.
pub const CERT_FILE: &str = "agent.crt";
/// The private key's file (mode 0600).
pub const KEY_FILE: &str = "agent.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(
        "invalid certificate fingerprint {0:?}: expected the SHA-256 of the certificate, 64 hex digits (colons allowed)"
    )]
    BadFingerprint(String),
    #[error(
        "{0} is served over HTTPS: its certificate's fingerprint is needed (`flotilla host` on its machine shows it)"
    )]
    FingerprintMissing(String),
    #[error("{0} is plain HTTP, yet a certificate fingerprint is given: use https://")]
    FingerprintOnPlainHttp(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Io { context, source }
}

/// An agent's certificate and key.
pub struct Identity {
    pub cert_path: PathBuf,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub fingerprint: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_path", &self.cert_path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a certificate's DER bytes, lowercase hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A fingerprint as users may write it (`AB:CD:...`, upper or lower case,
/// an optional `sha256:` prefix), in its canonical form.
pub fn parse_fingerprint(text: &str) -> Result<String, TlsError> {
    let bare = text.trim();
    let bare = bare.strip_prefix("sha256:").unwrap_or(bare);
    let hex: String = bare.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(TlsError::BadFingerprint(text.to_string()));
    }
    Ok(hex.to_ascii_lowercase())
}

/// Checks what a caller gave to reach an agent at `endpoint`: a fingerprint
/// that parses, and one at all for an `https://` endpoint.
pub fn check_pin(endpoint: &str, fingerprint: Option<&str>) -> Result<(), TlsError> {
    match fingerprint {
        Some(_) if endpoint.starts_with("http://") => {
            Err(TlsError::FingerprintOnPlainHttp(endpoint.to_string()))
        }
        Some(f) => parse_fingerprint(f).map(|_| ()),
        None if endpoint.starts_with("https://") => {
            Err(TlsError::FingerprintMissing(endpoint.to_string()))
        }
        None => Ok(()),
    }
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The fingerprint of the certificate in PEM file `path`.
pub fn fingerprint_of_file(path: &Path) -> Result<String, TlsError> {
    Ok(fingerprint(read_cert(path)?.as_ref()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash never leaves half a key; the file has `mode` whatever a leftover
/// temporary file had.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(format!("writing {}", tmp.display())))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
}

/// The identity in `dir`, made on first use with `names` (host names and
/// addresses) in the certificate, for clients that check names.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Identity, TlsError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !(cert_path.is_file() && key_path.is_file()) {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let made = rcgen::generate_simple_self_signed(names.to_vec())?;
        // The key first: a certificate without its key is never found.
        write_atomic(&key_path, made.key_pair.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, made.cert.pem().as_bytes(), 0o644)?;
        tracing::info!(cert = %cert_path.display(), "made the agent's TLS certificate");
    }
    let cert = read_cert(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Identity {
        fingerprint: fingerprint(cert.as_ref()),
        cert_path,
        cert,
        key,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: this identity, no client certificates (clients carry
/// bearer tokens).
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())?)
}

/// The client side: trusts the one certificate with `fingerprint` (names
/// are not checked: the fingerprint names the peer).
pub fn pinned_client_config(fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    let expected = parse_fingerprint(fingerprint)?;
    let provider = provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { expected, provider }))
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct Pinned {
    expected: String,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
struct NotPinned {
    expected: String,
    got: String,
}

impl fmt::Display for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the agent's certificate has fingerprint {}, not the expected {}",
            self.got, self.expected
        )
    }
}

impl std::error::Error for NotPinned {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity.as_ref());
        if got == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NotPinned {
                expected: self.expected.clone(),
                got,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A temporary file an interrupted write left, readable by all, does
        // not make the key readable by all.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::write(dir.path().join("agent.key.tmp"), b"x").unwrap();
            fs::set_permissions(
                dir.path().join("agent.key.tmp"),
                fs::Permissions::from_mode(0o644),
            )
            .unwrap();
        }
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let first = load_or_create(dir.path(), &names).unwrap();
        let again = load_or_create(dir.path(), &names).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(
            fingerprint_of_file(&first.cert_path).unwrap(),
            first.fingerprint
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&first).unwrap();
        pinned_client_config(&first.fingerprint).unwrap();
    }

    #[test]
    fn fingerprints_are_read_as_people_write_them() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), hex);
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")).unwrap(), hex);
        for bad in ["", "abc", &"zz".repeat(32)] {
            let err = parse_fingerprint(bad).unwrap_err().to_string();
            assert!(err.contains("64 hex digits"), "{err}");
        }
        assert!(check_pin("http://10.0.0.5:7777", None).is_ok());
        assert!(check_pin("http://10.0.0.5:7777", Some(&hex)).is_err());
        assert!(check_pin("https://10.0.0.5:7777", Some(&hex)).is_ok());
        let err = check_pin("https://10.0.0.5:7777", None).unwrap_err();
        assert!(err.to_string().contains("fingerprint is needed"), "{err}");
    }
}
