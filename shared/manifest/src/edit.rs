//! [`edit_text`]: one text's image references pointed at a new image, and
//! the check that the result reads back as done.

use crate::image_ref::ImageRef;
use crate::plan::{Kept, Plan, apply, plan};

/// Why an edit of one text failed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The new image is not a valid reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidImage { reference: String, reason: String },
    /// The text is not valid YAML.
    #[error("YAML syntax error at line {line}, column {column}: {message}")]
    Yaml {
        line: usize,
        column: usize,
        message: String,
    },
    /// A matching reference is written in a form that cannot be edited safely.
    #[error("cannot edit image reference at line {line}, column {column}: {reason}")]
    Unsupported {
        line: usize,
        column: usize,
        reason: String,
    },
}

/// The outcome of editing one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// The edited text (equal to the input when `changed == 0`).
    pub text: String,
    /// References to the repository found, including up-to-date and kept
    /// ones.
    pub matched: usize,
    /// References that were changed.
    pub changed: usize,
    /// References left as they were on purpose, in text order.
    pub kept: Vec<Kept>,
}

/// The new text (0 changed = none matched or all already up to date;
/// the caller decides if that is an error) and how many references
/// changed: [`edit_text`] without the count of up-to-date ones.
#[cfg(test)]
pub(crate) fn set_image(text: &str, new_image: &str) -> Result<(String, usize), EditError> {
    let edit = edit_text(text, new_image)?;
    Ok((edit.text, edit.changed))
}

/// Replace the tag/digest of every image reference whose repository equals
/// `new_image`'s repository, counting the references found (up-to-date
/// ones included) and those changed.
///
/// # Errors
/// An invalid `new_image`, a YAML syntax error, or a matching reference
/// written in a form that cannot be edited safely (block scalar, multi-line
/// plain scalar, alias of a scalar).
pub fn edit_text(text: &str, new_image: &str) -> Result<Edit, EditError> {
    edit_text_keeping(text, new_image, &|_| None)
}

/// [`edit_text`], leaving alone every matching reference on a line with a
/// `# capstan: pin` comment ([`crate::PIN_COMMENT`]) and every one for which
/// `keep` gives a reason (`order: monotonic`: a newer image is there).
/// `keep` sees the reference as written and must answer the same for the
/// same reference (the result is checked by editing it again).
///
/// # Errors
/// As [`edit_text`].
pub fn edit_text_keeping(
    text: &str,
    new_image: &str,
    keep: &dyn Fn(&ImageRef<'_>) -> Option<String>,
) -> Result<Edit, EditError> {
    let new_ref = ImageRef::parse(new_image).map_err(|reason| EditError::InvalidImage {
        reference: new_image.to_owned(),
        reason,
    })?;
    if new_ref.tag.is_none() && new_ref.digest.is_none() {
        return Err(EditError::InvalidImage {
            reference: new_image.to_owned(),
            reason: "it needs a tag (`:v1`) or a digest (`@sha256:...`)".to_owned(),
        });
    }
    let Plan {
        matched,
        changed,
        splices,
        kept,
    } = plan(text, &new_ref, keep)?;
    if splices.is_empty() {
        return Ok(Edit {
            text: text.to_owned(),
            matched,
            changed: 0,
            kept,
        });
    }
    let out = apply(text, splices);
    // The edit must read back as done: same references found, none left to change.
    match plan(&out, &new_ref, keep) {
        Ok(again) if again.matched == matched && again.splices.is_empty() => {}
        _ => {
            return Err(EditError::Unsupported {
                line: 1,
                column: 1,
                reason: "the edited file did not read back as expected; edit it by hand".to_owned(),
            });
        }
    }
    Ok(Edit {
        text: out,
        matched,
        changed,
        kept,
    })
}
