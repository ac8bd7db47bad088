//! A run record as the store holds it: the password of its repository URL
//! sealed ([`crate::seal`]) instead of in clear, so a copy of the store (an
//! etcd backup, a redb file) holds no usable credential.
//!
//! In memory the scheduler keeps the URL whole: the offer hands it to the
//! runner, which clones with it. Everything that shows a run redacts it
//! (`capstan_proto::redact`). Stored, `repo` has `***` for the password and
//! `repo_password` the sealed password.

use crate::model::RunRecord;
use crate::seal::Sealer;
use capstan_proto::redact::{REDACTED, password_range};

/// The stored bytes of `run`.
pub(crate) fn encode(run: &RunRecord, sealer: &Sealer) -> Vec<u8> {
    let range = password_range(&run.repo).filter(|r| &run.repo[r.clone()] != REDACTED);
    let Some(range) = range else {
        // No password, or one this replica could not open (still sealed in
        // `repo_password`): stored as it is.
        return serde_json::to_vec(run).expect("records serialize");
    };
    let mut stored = run.clone();
    stored.repo_password = sealer.seal(&run.repo[range.clone()]);
    stored.repo.replace_range(range, REDACTED);
    serde_json::to_vec(&stored).expect("records serialize")
}

/// The record in `bytes`, its URL whole again. A password that does not
/// open with this replica's key stays sealed, and the URL redacted: nothing
/// is lost (a leader with the right key opens it), the error says which
/// flag to fix, and the run's checkout fails to authenticate.
pub(crate) fn decode(bytes: &[u8], sealer: &Sealer) -> Result<RunRecord, serde_json::Error> {
    let mut run: RunRecord = serde_json::from_slice(bytes)?;
    if run.repo_password.is_empty() {
        return Ok(run);
    }
    let Some(range) = password_range(&run.repo) else {
        tracing::error!(run = %run.id, "a stored run has a sealed password but no password in its URL; its checkout goes without");
        return Ok(run);
    };
    match sealer.open(&run.repo_password) {
        Ok(password) => {
            run.repo.replace_range(range, &password);
            run.repo_password.clear();
        }
        Err(e) => {
            tracing::error!(run = %run.id, error = %e, "cannot open the password of the run's repository URL")
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::api::v1::SubmitRunRequest;

    fn run(repo: &str) -> RunRecord {
        crate::api::pipeline::build_run(SubmitRunRequest {
            pipeline_yaml: "version: 1\nname: p\ntasks:\n  t:\n    steps: [ { run: 'true' } ]\n"
                .into(),
            repo: repo.into(),
            ..Default::default()
        })
        .expect("valid pipeline")
    }

    #[test]
    fn the_password_is_stored_sealed_and_comes_back_whole() {
        let key = Sealer::from_key(&[3; 32]);
        let r = run("http://bob:s3cret-pw@git.example/r.git");
        let bytes = encode(&r, &key);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert!(text.contains("http://bob:***@git.example/r.git"), "{text}");
        assert!(text.contains("\"repo_password\":\"v1:"), "{text}");
        let back = decode(&bytes, &key).unwrap();
        assert_eq!(back.repo, r.repo);
        assert!(back.repo_password.is_empty());
    }

    #[test]
    fn a_url_without_a_password_is_stored_as_it_is() {
        let key = Sealer::from_key(&[3; 32]);
        for url in [
            "",
            "http://git.example/r.git",
            "http://bob@git.example/r.git",
        ] {
            let r = run(url);
            let bytes = encode(&r, &key);
            assert_eq!(bytes, serde_json::to_vec(&r).unwrap());
            assert_eq!(decode(&bytes, &key).unwrap().repo, url);
        }
    }

    #[test]
    fn another_key_keeps_the_password_sealed_and_loses_nothing() {
        let r = run("http://bob:s3cret-pw@git.example/r.git");
        let bytes = encode(&r, &Sealer::from_key(&[3; 32]));
        let other = Sealer::from_key(&[4; 32]);
        let loaded = decode(&bytes, &other).unwrap();
        assert_eq!(loaded.repo, "http://bob:***@git.example/r.git");
        assert!(loaded.repo_password.starts_with("v1:"));
        // Stored again by that replica, then loaded by one with the key.
        let again = encode(&loaded, &other);
        assert_eq!(
            decode(&again, &Sealer::from_key(&[3; 32])).unwrap().repo,
            r.repo
        );
    }
}
