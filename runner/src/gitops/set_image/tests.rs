use super::files::{FileReport, set_image_in_files};
use super::*;
use capstan_manifest::EditError;
use std::fs;

fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    dir
}

const POD: &str = "kind: Pod\nspec:\n  containers:\n  - image: app:v1\n";

#[test]
fn files_are_edited_in_place_and_reported() {
    let dir = repo_with(&[
        ("k8s/pod.yaml", POD),
        ("k8s/other.yaml", "kind: Pod\n"),
        ("k8s/up.yaml", "images:\n- name: app\n  newTag: v2\n"),
    ]);
    let files = ["k8s/pod.yaml", "./k8s/../k8s/other.yaml", "k8s/up.yaml"].map(String::from);
    let report = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap();
    assert_eq!((report.matched(), report.changed()), (2, 1));
    assert_eq!(
        report.files[0],
        FileReport {
            path: files[0].clone(),
            matched: 1,
            changed: 1,
            kept: Vec::new(),
        }
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("k8s/pod.yaml")).unwrap(),
        POD.replace("v1", "v2")
    );
    // Only the real files remain (no temporary files left behind).
    assert_eq!(fs::read_dir(dir.path().join("k8s")).unwrap().count(), 3);
    // Running again: everything is up to date.
    let report = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap();
    assert_eq!((report.matched(), report.changed()), (2, 0));
}

#[test]
fn no_match_is_an_error_unless_allowed() {
    let dir = repo_with(&[("pod.yaml", POD)]);
    let files = vec!["pod.yaml".to_owned()];
    let err = set_image_in_files(dir.path(), &files, "other:v2", false).unwrap_err();
    assert!(matches!(err, SetImageError::NoMatch { .. }), "{err}");
    let report = set_image_in_files(dir.path(), &files, "other:v2", true).unwrap();
    assert_eq!((report.matched(), report.changed()), (0, 0));
}

#[test]
fn a_bad_file_leaves_every_file_unwritten() {
    let dir = repo_with(&[("a.yaml", POD), ("b.yaml", "kind: Pod\nspec: [\n")]);
    let files = vec!["a.yaml".to_owned(), "b.yaml".to_owned()];
    let err = set_image_in_files(dir.path(), &files, "app:v2", false).unwrap_err();
    assert!(
        matches!(&err, SetImageError::InFile { path, source } if path == "b.yaml" && matches!(**source, SetImageError::Edit(EditError::Yaml { .. }))),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("b.yaml: YAML syntax error at line"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(dir.path().join("a.yaml")).unwrap(), POD);
}

#[test]
fn paths_outside_the_repository_are_refused() {
    let outside = repo_with(&[("secret.yaml", POD)]);
    let dir = repo_with(&[("pod.yaml", POD), ("sub/x.yaml", POD)]);
    let abs = outside.path().join("secret.yaml").display().to_string();
    std::os::unix::fs::symlink(
        outside.path().join("secret.yaml"),
        dir.path().join("link.yaml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
    std::os::unix::fs::symlink("pod.yaml", dir.path().join("inside-link.yaml")).unwrap();
    std::os::unix::fs::symlink("missing.yaml", dir.path().join("dangling.yaml")).unwrap();
    let name = outside.path().file_name().unwrap().to_str().unwrap();
    for bad in [
        abs.as_str(),
        ".git/config",
        "../x.yaml",
        &format!("../{name}/secret.yaml"),
        "sub/../../x.yaml",
        "link.yaml",
        "linkdir/secret.yaml",
        "dangling.yaml",
        "sub",
        "",
    ] {
        let err = set_image_in_files(dir.path(), &[bad.to_owned()], "app:v2", true).unwrap_err();
        assert!(
            matches!(err, SetImageError::UnsafePath { .. }),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(
        fs::read_to_string(outside.path().join("secret.yaml")).unwrap(),
        POD
    );

    let err =
        set_image_in_files(dir.path(), &["nope.yaml".to_owned()], "app:v2", true).unwrap_err();
    assert!(matches!(err, SetImageError::NotFound { .. }), "{err}");

    // A symlink that stays inside is followed, and the target is edited.
    let report = set_image_in_files(
        dir.path(),
        &["inside-link.yaml".to_owned()],
        "app:v2",
        false,
    )
    .unwrap();
    assert_eq!(report.changed(), 1);
    assert_eq!(
        fs::read_to_string(dir.path().join("pod.yaml")).unwrap(),
        POD.replace("v1", "v2")
    );
    assert!(
        fs::symlink_metadata(dir.path().join("inside-link.yaml"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
