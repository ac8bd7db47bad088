//! Who write-back commits are made as: `--git-author`, `Name <email>`.

/// Default of `--git-author`.
pub const DEFAULT_AUTHOR: &str = "Capstan Bot <capstan@localhost>";

/// The identity write-back commits are made as (author and committer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub name: String,
    pub email: String,
}

impl std::str::FromStr for Author {
    type Err = String;
    /// `Name <email>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not `Name <email>`, e.g. `{DEFAULT_AUTHOR}`");
        let (name, rest) = s.split_once('<').ok_or_else(bad)?;
        let email = rest.strip_suffix('>').ok_or_else(bad)?.trim();
        let name = name.trim();
        if name.is_empty() || email.is_empty() || email.contains(['<', '>']) {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_owned(),
            email: email.to_owned(),
        })
    }
}

impl Default for Author {
    fn default() -> Self {
        DEFAULT_AUTHOR
            .parse()
            .unwrap_or_else(|_| unreachable!("the default author parses"))
    }
}

impl std::fmt::Display for Author {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} <{}>", self.name, self.email)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authors() {
        let a: Author = "Deploy Bot <deploy@example.com>".parse().unwrap();
        assert_eq!(a.name, "Deploy Bot");
        assert_eq!(a.email, "deploy@example.com");
        assert_eq!(Author::default().to_string(), DEFAULT_AUTHOR);
        assert!("no email".parse::<Author>().is_err());
        assert!("<x@y>".parse::<Author>().is_err());
    }
}
