//! Test certificates, made with rcgen: a CA, the coordinator's server
//! certificate (SANs `127.0.0.1`, `::1`, `localhost`), runners' client
//! certificates (CN = the runner's name), and the broken ones the failure
//! tests need (expired, from another CA). Written as PEM files, as a user
//! would have them (README "Running across hosts securely" shows the
//! openssl commands for the same files).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A PEM certificate and its key on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA in a directory, and the certificates it signs there.
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named `name`; its certificate is `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca,
        })
    }

    /// The CA certificate (for `--ca-cert` and `--tls-client-ca`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for loopback, as `<file>.pem` and `<file>-key.pem`.
    pub fn server(&self, file: &str) -> anyhow::Result<CertFiles> {
        self.server_named(file, "capstan-coordinator")
    }

    /// [`Pki::server`] with CN `cn` (a rotated certificate tells itself apart).
    pub fn server_named(&self, file: &str, cn: &str) -> anyhow::Result<CertFiles> {
        self.issue(file, cn, server_params()?)
    }

    /// A server certificate for loopback that expired in 2021.
    pub fn expired_server(&self, file: &str) -> anyhow::Result<CertFiles> {
        let mut params = server_params()?;
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.issue(file, "capstan-coordinator", params)
    }

    /// A runner's client certificate with CN `cn`.
    pub fn client(&self, file: &str, cn: &str) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, cn, params)
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        mut params: CertificateParams,
    ) -> anyhow::Result<CertFiles> {
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        // Written beside and renamed, as certificate tools replace files:
        // a coordinator reloading them never reads half a file.
        for (path, text) in [(&files.key, key.serialize_pem()), (&files.cert, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(files)
    }
}

fn server_params() -> anyhow::Result<CertificateParams> {
    let mut params =
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}
