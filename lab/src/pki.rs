//! TLS material and kubeconfigs for a lab's control plane, generated on the spot per lab: a CA,
//! the API server's serving certificate, client certificates for the components, and the
//! ServiceAccount token signing key. Nothing is shared between labs or kept after `down`.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Errors generating or writing TLS material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A client identity: the certificate's CN is the user, O the groups.
#[derive(Debug, Clone)]
pub struct ClientIdentity<'a> {
    /// File stem: `<name>.crt`, `<name>.key`, `<name>.kubeconfig`.
    pub name: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

/// Paths of what [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// ServiceAccount token signing key.
    pub sa_key: PathBuf,
    /// Its public half, which verifies tokens.
    pub sa_pub: PathBuf,
}

impl Pki {
    /// The kubeconfig written for a client identity.
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.kubeconfig"))
    }
}

fn write(path: &Path, contents: &str) -> Result<(), PkiError> {
    fs::write(path, contents).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })?;
    // Keys and kubeconfigs are secrets: owner only.
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

fn generate_err(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

/// Generates everything into `dir` (created): `ca.crt`, `apiserver.{crt,key}` valid for
/// `server_names` and `server_ips`, `sa.key`, and for each client a certificate, key and a
/// kubeconfig pointing at `server_url`.
pub fn generate(
    dir: &Path,
    server_url: &str,
    server_names: &[&str],
    server_ips: &[IpAddr],
    clients: &[ClientIdentity<'_>],
) -> Result<Pki, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(generate_err("the CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(generate_err("CA"))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "netpol-lab-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(generate_err("the CA certificate"))?;
    let ca = Issuer::new(ca_params, ca_key);
    let pki = Pki {
        dir: dir.to_owned(),
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };
    write(&pki.ca_cert, &ca_cert.pem())?;

    let mut sans: Vec<String> = server_names.iter().map(|s| (*s).to_owned()).collect();
    sans.extend(server_ips.iter().map(IpAddr::to_string));
    let key = KeyPair::generate().map_err(generate_err("the API server key"))?;
    let mut params = CertificateParams::new(sans).map_err(generate_err("API server SANs"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&key, &ca)
        .map_err(generate_err("the API server certificate"))?;
    write(&pki.server_cert, &cert.pem())?;
    write(&pki.server_key, &key.serialize_pem())?;

    let sa = KeyPair::generate().map_err(generate_err("the ServiceAccount signing key"))?;
    write(&pki.sa_key, &sa.serialize_pem())?;
    write(&pki.sa_pub, &sa.public_key_pem())?;

    for client in clients {
        let key = KeyPair::generate().map_err(generate_err(client.name))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(generate_err(client.name))?;
        params
            .distinguished_name
            .push(DnType::CommonName, client.user);
        for group in client.groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &ca)
            .map_err(generate_err(client.name))?;
        let (crt, keyf) = (
            dir.join(format!("{}.crt", client.name)),
            dir.join(format!("{}.key", client.name)),
        );
        write(&crt, &cert.pem())?;
        write(&keyf, &key.serialize_pem())?;
        write(
            &pki.kubeconfig(client.name),
            &kubeconfig(
                server_url,
                &pki.ca_cert,
                client.user,
                Credentials::Cert {
                    cert: &crt,
                    key: &keyf,
                },
            ),
        )?;
    }
    Ok(pki)
}

/// How a kubeconfig's user authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Credentials<'a> {
    Cert { cert: &'a Path, key: &'a Path },
    Token(&'a str),
}

/// A kubeconfig with one cluster, user and context.
pub fn kubeconfig(server_url: &str, ca: &Path, user: &str, credentials: Credentials<'_>) -> String {
    let user_fields = match credentials {
        Credentials::Cert { cert, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            cert.display(),
            key.display()
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server_url}\n    \
         certificate-authority: {}\nusers:\n- name: {user}\n  user:\n{user_fields}contexts:\n- name: lab\n  \
         context:\n    cluster: lab\n    user: {user}\ncurrent-context: lab\n",
        ca.display()
    )
}

/// Writes a kubeconfig that authenticates with a bearer token (a ServiceAccount's), with the
/// ServiceAccount's namespace as the context's, as a pod of it gets in-cluster.
pub fn write_token_kubeconfig(
    path: &Path,
    server_url: &str,
    ca: &Path,
    user: &str,
    namespace: &str,
    token: &str,
) -> Result<(), PkiError> {
    let text = kubeconfig(server_url, ca, user, Credentials::Token(token)).replacen(
        "  context:\n    cluster: lab\n",
        &format!("  context:\n    cluster: lab\n    namespace: {namespace}\n"),
        1,
    );
    write(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_ca_server_and_clients_with_kubeconfigs() {
        let dir = std::env::temp_dir().join(format!("netpol-lab-pki-{}", std::process::id()));
        let pki = generate(
            &dir,
            "https://172.31.0.253:6443",
            &["kubernetes", "localhost"],
            &[
                "172.31.0.253".parse().unwrap(),
                "10.96.0.1".parse().unwrap(),
            ],
            &[ClientIdentity {
                name: "admin",
                user: "lab-admin",
                groups: &["system:masters"],
            }],
        )
        .expect("generate");
        let ca = fs::read_to_string(&pki.ca_cert).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        assert!(
            fs::read_to_string(&pki.sa_key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        let kc = fs::read_to_string(pki.kubeconfig("admin")).unwrap();
        assert!(kc.contains("server: https://172.31.0.253:6443"), "{kc}");
        assert!(kc.contains("client-key: "), "{kc}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir.join("admin.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
