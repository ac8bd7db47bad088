use crate::edit::set_image;
use crate::*;

const NEW: &str = "127.0.0.1:5000/demo-ns/app:v2";
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// `out` is `input` with the single occurrence of `from` replaced by `to`.
#[track_caller]
fn assert_only(input: &str, out: &str, from: &str, to: &str) {
    assert_eq!(
        input.matches(from).count(),
        1,
        "{from:?} must occur once in the input"
    );
    assert_eq!(out, input.replace(from, to));
}

#[track_caller]
fn edit(input: &str, image: &str) -> Edit {
    edit_text(input, image).unwrap_or_else(|e| panic!("edit failed: {e}"))
}

#[test]
fn pod_containers_init_and_ephemeral() {
    let input = "\
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  initContainers:
    - name: init
      image: 127.0.0.1:5000/demo-ns/app:v1
  containers:
    - name: main
      image: 127.0.0.1:5000/demo-ns/app:v1
    - name: sidecar
      image: 127.0.0.1:5000/demo-ns/sidecar:v1
  ephemeralContainers:
  - name: debug
    image: 127.0.0.1:5000/demo-ns/app:v1
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (3, 3));
    assert_eq!(e.text, input.replace("demo-ns/app:v1", "demo-ns/app:v2"));
}

#[test]
fn every_workload_kind() {
    for kind in [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Job",
        "ReplicationController",
    ] {
        let input = format!(
            "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  replicas: 1\n  template:\n    metadata:\n      labels: {{app: w}}\n    spec:\n      initContainers:\n      - name: i\n        image: 127.0.0.1:5000/demo-ns/app:v1\n      containers:\n      - name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1\n"
        );
        let e = edit(&input, NEW);
        assert_eq!((e.matched, e.changed), (2, 2), "{kind}");
        assert_eq!(e.text, input.replace(":v1", ":v2"), "{kind}");
    }
}

#[test]
fn cronjob_and_pod_template_and_list() {
    let cron = "\
kind: CronJob
spec:
  schedule: '*/5 * * * *'
  jobTemplate:
    spec:
      template:
        spec:
          containers:
          - name: c
            image: 127.0.0.1:5000/demo-ns/app:v1
";
    assert_only(cron, &edit(cron, NEW).text, "app:v1", "app:v2");

    let template = "kind: PodTemplate\ntemplate:\n  spec:\n    containers:\n    - {name: c, image: 127.0.0.1:5000/demo-ns/app:v1}\n";
    assert_only(template, &edit(template, NEW).text, "app:v1", "app:v2");

    let list = "kind: List\nitems:\n- kind: Pod\n  spec:\n    containers:\n    - name: c\n      image: 127.0.0.1:5000/demo-ns/app:v1\n";
    assert_only(list, &edit(list, NEW).text, "app:v1", "app:v2");
}

#[test]
fn job_template_in_a_deployment_path_is_not_confused() {
    // A CronJob's pod spec is not at spec.template.spec; a Pod's is not at spec.template.
    let input = "kind: Pod\nspec:\n  template:\n    spec:\n      containers:\n      - image: 127.0.0.1:5000/demo-ns/app:v1\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed, e.text.as_str()), (0, 0, input));
}

#[test]
fn multi_document_file() {
    let input = "\
# first
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  ports: [{port: 80}]
---
kind: Deployment
spec:
  template:
    spec:
      containers:
      - name: a
        image: 127.0.0.1:5000/demo-ns/app:v1
---
kind: Pod
spec:
  containers:
  - name: b
    image: \"127.0.0.1:5000/demo-ns/app:v1\"
...
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (2, 2));
    assert_eq!(e.text, input.replace("app:v1", "app:v2"));
}

#[test]
fn kustomization_existing_new_tag() {
    let input = "\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - deployment.yaml
images:
  - name: 127.0.0.1:5000/demo-ns/other
    newTag: v1
  - name: 127.0.0.1:5000/demo-ns/app
    newTag: v1 # pinned by CI
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_only(input, &e.text, "newTag: v1 #", "newTag: v2 #");
}

#[test]
fn kustomization_missing_new_tag_is_added_with_the_entry_indentation() {
    let input = "resources:\n- pod.yaml\nimages:\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: 127.0.0.1:5000/demo-ns/app\n- name: nginx\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_only(
        input,
        &e.text,
        "  newName: 127.0.0.1:5000/demo-ns/app\n",
        "  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n",
    );

    // Deeper indentation, CRLF, no trailing newline.
    let input = "images:\r\n    -   name: 127.0.0.1:5000/demo-ns/app";
    let e = edit(input, NEW);
    assert_eq!(
        e.text,
        "images:\r\n    -   name: 127.0.0.1:5000/demo-ns/app\r\n        newTag: v2"
    );

    // Flow style entry.
    let input = "images: [{name: 127.0.0.1:5000/demo-ns/app}]\n";
    assert_eq!(
        edit(input, NEW).text,
        "images: [{name: 127.0.0.1:5000/demo-ns/app, newTag: v2}]\n"
    );
}

#[test]
fn kustomization_tags_that_look_like_numbers_are_quoted() {
    let input = "images:\n- name: app\n  newTag: v1\n";
    assert_only(
        input,
        &edit(input, "app:1.10").text,
        "newTag: v1",
        "newTag: \"1.10\"",
    );
    let input = "images:\n- name: app\n";
    assert_eq!(
        edit(input, "app:1234567").text,
        "images:\n- name: app\n  newTag: \"1234567\"\n"
    );
    let input = "images:\n- name: app\n  newTag: '1.0'\n";
    assert_only(input, &edit(input, "app:2.0").text, "'1.0'", "'2.0'");
}

#[test]
fn kustomization_digest() {
    // Added when absent (the tag is left as it was).
    let input = "kind: Kustomization\nimages:\n- name: app\n  newTag: v1\n";
    let e = edit(input, &format!("app@{DIGEST}"));
    assert_eq!(
        e.text,
        format!("kind: Kustomization\nimages:\n- name: app\n  newTag: v1\n  digest: {DIGEST}\n")
    );
    // Replaced when present.
    let old = format!("sha256:{}", "f".repeat(64));
    let input = format!("images:\n- name: app\n  digest: \"{old}\"\n");
    let e = edit(&input, &format!("app@{DIGEST}"));
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_only(&input, &e.text, &old, DIGEST);
    // A tag-only image drops the old digest, which would keep pinning.
    let input =
        format!("images:\n- name: app # the app\n  digest: {old} # pinned\n  newName: app\n");
    let e = edit(&input, "app:v2");
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_eq!(
        e.text,
        "images:\n- name: app # the app\n  newName: app\n  newTag: v2\n"
    );
    // The last line, without a line break.
    let input = format!("images:\r\n- name: app\r\n  newTag: v1\r\n  digest: {old}");
    assert_eq!(
        edit(&input, "app:v2").text,
        "images:\r\n- name: app\r\n  newTag: v2"
    );
}

#[test]
fn kustomization_matches_new_name_not_the_placeholder_name() {
    let input = "images:\n- name: placeholder\n  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v1\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: elsewhere/app\n  newTag: v1\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_eq!(
        e.text,
        "images:\n- name: placeholder\n  newName: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n- name: 127.0.0.1:5000/demo-ns/app\n  newName: elsewhere/app\n  newTag: v1\n"
    );
}

#[test]
fn comments_quotes_indentation_and_crlf_are_preserved() {
    let input = "# leading comment\r\nkind: Deployment   # trailing\r\nspec:\r\n    template:\r\n        spec:\r\n            containers:\r\n                -   name: \"c\"\r\n                    # the image\r\n                    image:    \"127.0.0.1:5000/demo-ns/app:v1\"   # keep me\r\n                    args: ['--x', \"y\"]\r\n                -   name: d\r\n                    image: '127.0.0.1:5000/demo-ns/app@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff'\r\n# end without newline";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (2, 2));
    let once = input.replace(
        "\"127.0.0.1:5000/demo-ns/app:v1\"",
        "\"127.0.0.1:5000/demo-ns/app:v2\"",
    );
    assert_ne!(once, input);
    let twice = once.replace(
            "'127.0.0.1:5000/demo-ns/app@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff'",
            "'127.0.0.1:5000/demo-ns/app:v2'",
        );
    assert_eq!(e.text, twice);
}

#[test]
fn registry_port_is_not_a_tag() {
    let input = "kind: Pod\nspec:\n  containers:\n  - image: 127.0.0.1:5000/demo-ns/app\n  - image: 127.0.0.1:5001/demo-ns/app:v1\n  - image: 127.0.0.1:5000/demo-ns/app-x:v1\n  - image: 127.0.0.1:5000/app:v1\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_only(
        input,
        &e.text,
        "5000/demo-ns/app\n",
        "5000/demo-ns/app:v2\n",
    );
}

#[test]
fn non_matching_repositories_are_untouched() {
    let input = "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.27\n  - image: 127.0.0.1:5000/demo-ns/other:v1\n  - image: \"not a reference\"\n  - image:\n  - image: [a, b]\n";
    let (out, changed) = set_image(input, NEW).unwrap();
    assert_eq!((out.as_str(), changed), (input, 0));
}

#[test]
fn already_up_to_date_counts_as_zero_changes() {
    let input = "kind: Pod\nspec:\n  containers:\n  - image: 127.0.0.1:5000/demo-ns/app:v2\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed, e.text.as_str()), (1, 0, input));
    assert_eq!(set_image(input, NEW).unwrap(), (input.to_owned(), 0));
    let input = "images:\n- name: 127.0.0.1:5000/demo-ns/app\n  newTag: v2\n";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed, e.text.as_str()), (1, 0, input));
}

#[test]
fn image_keys_outside_the_container_paths_are_untouched() {
    let input = "\
kind: Deployment
metadata:
  annotations:
    image: 127.0.0.1:5000/demo-ns/app:v1
spec:
  image: 127.0.0.1:5000/demo-ns/app:v1
  template:
    metadata:
      labels:
        image: 127.0.0.1:5000/demo-ns/app:v1
    spec:
      containers:
      - name: c
        image: 127.0.0.1:5000/demo-ns/app:v1
        env:
        - name: image
          value: 127.0.0.1:5000/demo-ns/app:v1
---
kind: ConfigMap
data:
  image: 127.0.0.1:5000/demo-ns/app:v1
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    assert_only(
        input,
        &e.text,
        "- name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1",
        "- name: c\n        image: 127.0.0.1:5000/demo-ns/app:v2",
    );
}

#[test]
fn docker_hub_spellings_match_and_keep_their_spelling() {
    let input = "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.25\n  - image: docker.io/library/nginx\n  - image: library/nginx:1@sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff\n";
    let e = edit(input, "docker.io/library/nginx:1.27");
    assert_eq!(
        e.text,
        "kind: Pod\nspec:\n  containers:\n  - image: nginx:1.27\n  - image: docker.io/library/nginx:1.27\n  - image: library/nginx:1.27\n"
    );
}

#[test]
fn digest_and_tag_with_digest() {
    let input = "kind: Pod\nspec:\n  containers:\n  - image: app:v1\n";
    let e = edit(input, &format!("app:v2@{DIGEST}"));
    assert_only(input, &e.text, "app:v1", &format!("app:v2@{DIGEST}"));
    let e = edit(input, &format!("app@{DIGEST}"));
    assert_only(input, &e.text, "app:v1", &format!("app@{DIGEST}"));
}

#[test]
fn flow_style_containers() {
    let input = "kind: Pod\nspec: {containers: [{name: a, image: app:v1}, {name: b, image: 'app'}, {name: \"é\", image: \"app:v0\"}]}\n";
    let e = edit(input, "app:v2");
    assert_eq!((e.matched, e.changed), (3, 3));
    assert_eq!(
        e.text,
        "kind: Pod\nspec: {containers: [{name: a, image: app:v2}, {name: b, image: 'app:v2'}, {name: \"é\", image: \"app:v2\"}]}\n"
    );
}

#[test]
fn non_ascii_text_before_the_edit() {
    let input = "# déploiement — ünïcode ✓\nkind: Pod\nmetadata:\n  annotations: {note: \"日本語\"}\nspec:\n  containers:\n  - image: app:v1 # ✓\n";
    assert_only(input, &edit(input, "app:v2").text, "app:v1", "app:v2");
}

#[test]
fn unsafe_forms_are_refused_clearly() {
    let block = "kind: Pod\nspec:\n  containers:\n  - image: |\n      app:v1\n";
    let err = set_image(block, "app:v2").unwrap_err();
    assert!(
        matches!(err, EditError::Unsupported { line: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("block scalar"), "{err}");

    let alias = "x: &img app:v1\nkind: Pod\nspec:\n  containers:\n  - image: *img\n";
    let err = set_image(alias, "app:v2").unwrap_err();
    assert!(err.to_string().contains("alias"), "{err}");

    // Folded over two lines with an escaped line break.
    let multi_line = "kind: Pod\nspec:\n  containers:\n  - image: \"app:\\\n      v1\"\n";
    let err = set_image(multi_line, "app:v2").unwrap_err();
    assert!(
        matches!(err, EditError::Unsupported { line: 4, .. }),
        "{err}"
    );
    // On the next line is fine.
    let next_line = "kind: Pod\nspec:\n  containers:\n  - image:\n      app:v1\n";
    assert_only(
        next_line,
        &set_image(next_line, "app:v2").unwrap().0,
        "app:v1",
        "app:v2",
    );

    let escaped = "kind: Pod\nspec:\n  containers:\n  - image: \"app:\\x76\\x31\"\n";
    let err = set_image(escaped, "app:v2").unwrap_err();
    assert!(err.to_string().contains("escapes"), "{err}");
}

#[test]
fn invalid_images_and_yaml_errors() {
    for bad in [
        "",
        "app",
        "App:v1",
        "app:",
        "app:v 1",
        "app@sha256:xyz",
        "host:port/app:v1",
        "-app:v1",
    ] {
        let err = set_image("kind: Pod\n", bad).unwrap_err();
        assert!(
            matches!(err, EditError::InvalidImage { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = set_image("kind: Pod\nspec:\n  containers: [a, b\n  x: y\n", "app:v2").unwrap_err();
    let EditError::Yaml { line, column, .. } = &err else {
        panic!("{err}")
    };
    assert!(*line >= 3 && *column >= 1, "{err}");
    assert!(
        err.to_string().starts_with("YAML syntax error at line"),
        "{err}"
    );
    let err = set_image("a: b\n c: d\n", "app:v2").unwrap_err();
    assert!(matches!(err, EditError::Yaml { line: 2, .. }), "{err}");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let err = set_image(&deep, "app:v2").unwrap_err();
    assert!(matches!(err, EditError::Yaml { .. }), "{err}");
}

#[test]
fn a_thousand_documents_are_quick() {
    let doc = "kind: Deployment\nmetadata:\n  name: d{i}\nspec:\n  template:\n    spec:\n      containers:\n      - name: c\n        image: 127.0.0.1:5000/demo-ns/app:v1 # c\n      - name: s\n        image: nginx:1\n";
    let input: String = (0..1000)
        .map(|i| format!("---\n{}", doc.replace("{i}", &i.to_string())))
        .collect();
    let started = std::time::Instant::now();
    let e = edit(&input, NEW);
    let took = started.elapsed();
    assert_eq!((e.matched, e.changed), (1000, 1000));
    assert_eq!(e.text, input.replace("app:v1", "app:v2"));
    assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
}

#[test]
fn a_pin_comment_and_the_callers_keep_leave_references_alone() {
    let input = "\
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  containers:
    - name: rolled-back
      image: 127.0.0.1:5000/demo-ns/app:v0 # capstan: pin (rollback, INC-12)
    - name: newer
      image: 127.0.0.1:5000/demo-ns/app:v3
    - name: older
      image: 127.0.0.1:5000/demo-ns/app:v1
";
    let keep =
        |old: &image_ref::ImageRef<'_>| (old.tag == Some("v3")).then(|| "v3 is newer".to_owned());
    let e = edit_text_keeping(input, NEW, &keep).unwrap();
    assert_eq!((e.matched, e.changed), (3, 1));
    assert_only(input, &e.text, "app:v1\n", "app:v2\n");
    assert_eq!(
        e.kept,
        vec![
            Kept {
                line: 8,
                reference: "127.0.0.1:5000/demo-ns/app:v0".into(),
                why: "pinned by its `# capstan: pin` comment".into(),
            },
            Kept {
                line: 10,
                reference: "127.0.0.1:5000/demo-ns/app:v3".into(),
                why: "v3 is newer".into(),
            },
        ]
    );
    // Without a keep the pin comment still holds.
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed, e.kept.len()), (3, 2, 1));
    assert!(e.text.contains("app:v0 # capstan: pin"));
}

#[test]
fn a_pinned_kustomize_entry_is_left_alone() {
    let input = "\
images:
  - name: 127.0.0.1:5000/demo-ns/app # capstan: pin
    newTag: v1
  - name: 127.0.0.1:5000/demo-ns/app2
    newTag: v1
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (1, 0));
    assert_eq!(e.text, input);
    assert_eq!(e.kept.len(), 1);
}

#[test]
fn helm_values_image_strings_and_repository_tag_pairs() {
    let input = "\
# values.yaml of a chart
replicaCount: 2
image:
  registry: 127.0.0.1:5000
  repository: demo-ns/app   # the app
  tag: \"v1\"
  pullPolicy: IfNotPresent
defaults: &defaults
  image: 127.0.0.1:5000/demo-ns/app:v1
worker:
  <<: *defaults
sidecars:
  - name: log
    image: 127.0.0.1:5000/demo-ns/sidecar:v1
  - name: proxy
    image:
        repository: 127.0.0.1:5000/demo-ns/app
        tag: v1
        digest: \"\"
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed), (3, 3), "{}", e.text);
    let want = input
        .replace("tag: \"v1\"", "tag: \"v2\"")
        .replace("demo-ns/app:v1", "demo-ns/app:v2")
        .replace("        tag: v1", "        tag: v2");
    assert_eq!(e.text, want);
    // Pinned to a digest: `digest:` where there is one, after the tag
    // where there is none.
    let pinned = format!("127.0.0.1:5000/demo-ns/app:v2@{DIGEST}");
    let e = edit(input, &pinned);
    assert!(
        e.text.contains(&format!("tag: \"v2@{DIGEST}\"")),
        "{}",
        e.text
    );
    assert!(
        e.text.contains(&format!("digest: \"{DIGEST}\"")),
        "{}",
        e.text
    );
    assert!(e.text.contains("        tag: v2\n"), "{}", e.text);
    assert!(e.text.contains("# the app"), "{}", e.text);
}

#[test]
fn helm_values_of_another_repository_and_pinned_lines_stay() {
    let input = "\
image:
  repository: other/app
  tag: v1
app:
  image:
    repository: 127.0.0.1:5000/demo-ns/app
    tag: v1 # capstan: pin
";
    let e = edit(input, NEW);
    assert_eq!((e.matched, e.changed, e.kept.len()), (1, 0, 1));
    assert_eq!(e.text, input);
}

#[test]
fn helm_aliases_that_repeat_or_nest_are_walked_once() {
    // Without a walked set, each level doubles: 2^N visits.
    let mut input = String::from("a0: &a0 [{image: 127.0.0.1:5000/demo-ns/app:v1}]\n");
    for i in 1..40 {
        input.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
    }
    let e = edit(&input, NEW);
    assert_eq!((e.matched, e.changed), (1, 1));
    // An alias inside its own anchor's node is refused by the parser or
    // walked once; either way it ends.
    let _ = edit_text("a: &a [*a, *a]\n", NEW);
}

#[test]
fn helm_a_new_image_without_digest_clears_the_old_one_and_pins_hold_on_any_line() {
    let input = "\
image:
  repository: 127.0.0.1:5000/demo-ns/app
  tag: v1
  digest: sha256:aaaa
";
    let e = edit(input, NEW);
    assert!(e.text.contains("tag: v2\n"), "{}", e.text);
    assert!(
        e.text.contains("digest: \"\"") || e.text.contains("digest: ''"),
        "{}",
        e.text
    );
    let pinned = input.replace("digest: sha256:aaaa", "digest: sha256:aaaa # capstan: pin");
    let e = edit(&pinned, NEW);
    assert_eq!((e.changed, e.kept.len()), (0, 1), "{}", e.text);
    let kustomize =
        "images:\n  - name: 127.0.0.1:5000/demo-ns/app\n    newTag: v1 # capstan: pin\n";
    let e = edit(kustomize, NEW);
    assert_eq!(
        (e.changed, e.kept.len(), e.text.as_str()),
        (0, 1, kustomize)
    );
}

#[test]
fn a_pin_comment_is_found_on_the_right_line_with_lone_cr_breaks() {
    let input = "apiVersion: v1\rkind: Pod\rspec:\r  containers:\r    - image: 127.0.0.1:5000/demo-ns/app:v1 # capstan: pin\r    - image: 127.0.0.1:5000/demo-ns/app:v0\r";
    let e = edit(input, NEW);
    assert_eq!(
        (e.matched, e.changed, e.kept.len()),
        (2, 1, 1),
        "{:?}",
        e.text
    );
    assert_eq!(e.kept[0].line, 5);
    assert!(e.text.contains("app:v1 # capstan: pin"), "{:?}", e.text);
}
