//! A task's outputs in the fields of the tasks that need it
//! (`${{ tasks.NAME.outputs.KEY }}`). Resolving at submit keeps each such
//! substitution as its placeholder, the expression's own text: in a plain
//! field where it stands, in a `run` script or a `ready` command in the
//! value of the variable the script refers to (so an output, like any
//! value, never enters a script's text). When the task is dispatched the
//! coordinator asks [`references`] which outputs it needs (failing the
//! task, naming them, when one is missing) and [`fill`]s them in.

use std::collections::BTreeSet;

use capstan_proto::pipeline::v1 as pb;

use crate::expr::{Expr, OPEN, Piece, scan};

/// The outputs `spec` refers to: (task, key) pairs.
pub fn references(spec: &pb::TaskSpec) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let mut spec = spec.clone();
    each_string(&mut spec, &mut |s| {
        if !s.contains(OPEN) {
            return;
        }
        for piece in scan(s).unwrap_or_default() {
            if let Piece::Expr(Expr::TaskOutput { task, key }) = piece {
                found.insert((task, key));
            }
        }
    });
    found
}

/// Puts each output's value where its placeholder stands; `value` gives
/// the value of (task, key). A placeholder without a value is left as it
/// is (the coordinator checks [`references`] first).
pub fn fill(spec: &mut pb::TaskSpec, value: impl Fn(&str, &str) -> Option<String>) {
    each_string(spec, &mut |s| {
        if !s.contains(OPEN) {
            return;
        }
        let Ok(pieces) = scan(s) else { return };
        let mut out = String::with_capacity(s.len());
        for piece in pieces {
            match piece {
                Piece::Lit(l) => out.push_str(l),
                Piece::Expr(e @ Expr::TaskOutput { .. }) => {
                    let Expr::TaskOutput { task, key } = &e else {
                        unreachable!()
                    };
                    match value(task, key) {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(&e.text()),
                    }
                }
                Piece::Expr(e) => out.push_str(&e.text()),
            }
        }
        *s = out;
    });
}

/// `text` with every output placeholder taken out: what is left of a
/// resolved pipeline must hold no `${{` (the fuzz target's invariant).
pub fn without_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let placeholder = after.find("}}").map(|end| &after[..end + 2]).filter(|p| {
            matches!(
                scan(p).ok().as_deref(),
                Some([Piece::Expr(Expr::TaskOutput { .. })])
            )
        });
        match placeholder {
            Some(p) => rest = &after[p.len()..],
            None => {
                out.push_str(OPEN);
                rest = &after[OPEN.len()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Calls `f` with every string of `spec` a substitution may stand in.
fn each_string(spec: &mut pb::TaskSpec, f: &mut impl FnMut(&mut String)) {
    use pb::step::Kind;
    f(&mut spec.image);
    spec.env.values_mut().for_each(&mut *f);
    for service in &mut spec.services {
        f(&mut service.image);
        service.command.iter_mut().for_each(&mut *f);
        service.env.values_mut().for_each(&mut *f);
        f(&mut service.ready);
    }
    for step in &mut spec.steps {
        f(&mut step.name);
        step.env.values_mut().for_each(&mut *f);
        match &mut step.kind {
            Some(Kind::Run(r)) => {
                f(&mut r.script);
                f(&mut r.image);
            }
            Some(Kind::Build(b)) => {
                f(&mut b.context);
                f(&mut b.dockerfile);
                f(&mut b.tag);
                b.args.values_mut().for_each(&mut *f);
            }
            Some(Kind::Push(p)) => f(&mut p.image),
            Some(Kind::SetImage(s)) => {
                f(&mut s.repo);
                s.files.iter_mut().for_each(&mut *f);
                f(&mut s.image);
                f(&mut s.digest);
            }
            Some(Kind::GitPush(g)) => {
                f(&mut g.message);
                f(&mut g.branch);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec() -> pb::TaskSpec {
        pb::TaskSpec {
            image: "${{ tasks.build.outputs.image }}".into(),
            env: HashMap::from([(
                "CAPSTAN_OUTPUT_build_digest".to_owned(),
                "${{ tasks.build.outputs.digest }}".to_owned(),
            )]),
            steps: vec![pb::Step {
                kind: Some(pb::step::Kind::SetImage(pb::SetImageStep {
                    image:
                        "app@${{ tasks.build.outputs.digest }} and ${{ tasks.lint.outputs.v-1 }}"
                            .into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn references_and_fill() {
        let mut s = spec();
        let refs: Vec<(String, String)> = references(&s).into_iter().collect();
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            refs,
            [
                pair("build", "digest"),
                pair("build", "image"),
                pair("lint", "v-1")
            ]
        );
        fill(&mut s, |task, key| match (task, key) {
            ("build", "digest") => Some("sha256:ab".into()),
            ("build", "image") => Some("r/app:1".into()),
            _ => None,
        });
        assert_eq!(s.image, "r/app:1");
        assert_eq!(s.env["CAPSTAN_OUTPUT_build_digest"], "sha256:ab");
        let Some(pb::step::Kind::SetImage(set)) = &s.steps[0].kind else {
            panic!()
        };
        assert_eq!(
            set.image, "app@sha256:ab and ${{ tasks.lint.outputs.v-1 }}",
            "a missing value leaves its placeholder"
        );
    }

    #[test]
    fn placeholders_come_out_and_nothing_else() {
        assert_eq!(
            without_placeholders("a ${{ tasks.b.outputs.c }} d ${{ params.x }} ${{ e"),
            "a  d ${{ params.x }} ${{ e"
        );
    }
}
