//! Secret masking of step output, before a byte reaches the spool.
//!
//! Each secret value is masked in several spellings: as is, each line of a
//! multi-line value, standard base64 (with and without padding) and
//! URL-encoded. Matching works across write boundaries: a write's tail that
//! could be the start of a secret is held back until the next write (or
//! [`MaskingSink::flush`]) tells whether it is one.

use std::io;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use async_trait::async_trait;
use base64::Engine as _;
use tokio::sync::Mutex;

use super::sink::OutputSink;

/// What a masked value is replaced with.
pub const MASK: &[u8] = b"[MASKED]";
/// Shorter values are not masked: masking every `a` would make logs useless
/// and protect nothing.
pub const MIN_SECRET_LEN: usize = 3;

/// The byte strings to mask for `values`, longest first.
pub fn patterns(values: &[String]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64_nopad = base64::engine::general_purpose::STANDARD_NO_PAD;
    let mut out: Vec<Vec<u8>> = Vec::new();
    for value in values {
        let mut forms = vec![value.clone()];
        forms.extend(
            value
                .lines()
                .map(|l| l.trim_end_matches('\r').to_owned())
                .filter(|l| l.trim().len() >= MIN_SECRET_LEN),
        );
        for form in forms.clone() {
            forms.push(b64.encode(&form));
            forms.push(b64_nopad.encode(&form));
            forms.push(url_encode(&form));
        }
        out.extend(
            forms
                .into_iter()
                .filter(|f| f.len() >= MIN_SECRET_LEN)
                .map(String::into_bytes),
        );
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Output not yet written, and what is known about it.
#[derive(Default)]
struct Pending {
    /// Bytes as the step wrote them.
    raw: Vec<u8>,
    /// How many leading bytes of `raw` lie inside a secret found earlier
    /// (one that started in output already written).
    covered: usize,
    /// The last byte written was part of a masked run: a run that goes on
    /// in `raw` gets no second [`MASK`].
    in_mask: bool,
}

/// Masks `pending.raw` and returns what can be written now; with `all`
/// false, a tail that may be the start of a secret stays pending.
///
/// Every byte inside any occurrence of any pattern is masked, also where
/// occurrences of two secrets overlap (a leftmost-first replace would leave
/// the second one's tail in clear); each run of masked bytes becomes one
/// [`MASK`]. Occurrences come from one Aho-Corasick pass over every
/// overlapping match (`finder`), so the cost per byte does not grow with
/// the number of spellings masked; a byte-by-byte check of every pattern
/// was most of a runner's CPU on a busy log.
fn mask_pending(
    pending: &mut Pending,
    patterns: &[Vec<u8>],
    finder: &AhoCorasick,
    all: bool,
) -> Vec<u8> {
    let data = std::mem::take(&mut pending.raw);
    let cut = if all {
        data.len()
    } else {
        data.len() - held_tail(&data, patterns)
    };
    // Masked ranges, merged: what an earlier occurrence still covers, then
    // every occurrence that starts before `cut` (it may reach past it).
    // (The overlapping search reports matches by where they end.)
    // Most output holds no secret: a plain scan says so at a fraction of
    // the overlapping search's cost per byte.
    let mut found: Vec<(usize, usize)> = if finder.is_match(&data[..]) {
        finder
            .find_overlapping_iter(&data[..])
            .filter(|m| m.start() < cut)
            .map(|m| (m.start(), m.end()))
            .collect()
    } else {
        Vec::new()
    };
    if pending.covered > 0 {
        found.push((0, pending.covered));
    }
    found.sort_unstable();
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(found.len());
    for (start, end) in found {
        match ranges.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => ranges.push((start, end)),
        }
    }
    let mut out = Vec::with_capacity(cut);
    let mut at = 0;
    let mut in_mask = pending.in_mask;
    for &(start, end) in &ranges {
        if start >= cut {
            break;
        }
        if start > at {
            out.extend_from_slice(&data[at..start]);
            in_mask = false;
        }
        if !in_mask {
            out.extend_from_slice(MASK);
            in_mask = true;
        }
        at = end.min(cut);
    }
    if at < cut {
        out.extend_from_slice(&data[at..cut]);
        in_mask = false;
    }
    let furthest = ranges.last().map_or(0, |r| r.1);
    pending.covered = furthest.saturating_sub(cut).min(data.len() - cut);
    pending.in_mask = in_mask;
    pending.raw = data[cut..].to_vec();
    out
}

/// Length of the longest tail of `data` that is a proper prefix of a pattern.
fn held_tail(data: &[u8], patterns: &[Vec<u8>]) -> usize {
    let longest = patterns.first().map_or(0, Vec::len);
    let max = longest.saturating_sub(1).min(data.len());
    (1..=max)
        .rev()
        .find(|&k| {
            let tail = &data[data.len() - k..];
            patterns.iter().any(|p| p.len() > k && p.starts_with(tail))
        })
        .unwrap_or(0)
}

/// An [`OutputSink`] that masks secrets and passes the rest to `inner`.
/// Call [`MaskingSink::flush`] when the step's output ended.
pub struct MaskingSink<'a> {
    inner: &'a dyn OutputSink,
    patterns: &'a [Vec<u8>],
    /// Finds every (overlapping) occurrence of `patterns`.
    finder: AhoCorasick,
    pending: Mutex<Pending>,
}

impl<'a> MaskingSink<'a> {
    pub fn new(inner: &'a dyn OutputSink, patterns: &'a [Vec<u8>]) -> Self {
        // Standard semantics: the only kind that reports overlapping
        // matches. A DFA without prefilter: logs are full of the bytes a
        // prefilter would look for (digits, hex, base64 letters), where it
        // only adds work; the DFA walks every byte once.
        let finder = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::DFA))
            .prefilter(false)
            .build(patterns)
            .expect("an automaton of a few short byte strings always builds");
        Self {
            inner,
            patterns,
            finder,
            pending: Mutex::new(Pending::default()),
        }
    }

    /// Writes what was held back (it can no longer become a secret).
    pub async fn flush(&self) -> io::Result<()> {
        let mut pending = self.pending.lock().await;
        if pending.raw.is_empty() {
            return Ok(());
        }
        let data = mask_pending(&mut pending, self.patterns, &self.finder, true);
        self.inner.write_owned(data).await
    }
}

#[async_trait]
impl OutputSink for MaskingSink<'_> {
    async fn write(&self, data: &[u8]) -> io::Result<()> {
        if self.patterns.is_empty() {
            return self.inner.write(data).await;
        }
        // The lock is held across the inner write so that output keeps its order.
        let mut pending = self.pending.lock().await;
        pending.raw.extend_from_slice(data);
        let masked = mask_pending(&mut pending, self.patterns, &self.finder, false);
        if masked.is_empty() {
            return Ok(());
        }
        self.inner.write_owned(masked).await
    }

    async fn write_owned(&self, data: Vec<u8>) -> io::Result<()> {
        if self.patterns.is_empty() {
            return self.inner.write_owned(data).await;
        }
        self.write(&data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::sink::testing::VecSink;

    async fn mask(values: &[&str], chunks: &[&[u8]]) -> String {
        let values: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
        let patterns = patterns(&values);
        let sink = VecSink::default();
        let masking = MaskingSink::new(&sink, &patterns);
        for c in chunks {
            masking.write(c).await.unwrap();
        }
        masking.flush().await.unwrap();
        sink.text()
    }

    #[tokio::test]
    async fn masks_plain_base64_and_url_encoded_forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("p@ss word!");
        let text = format!("a p@ss word! b {b64} c p%40ss%20word%21 d\n");
        let out = mask(&["p@ss word!"], &[text.as_bytes()]).await;
        assert_eq!(out, "a [MASKED] b [MASKED] c [MASKED] d\n");
    }

    #[tokio::test]
    async fn masks_each_line_of_a_multi_line_secret() {
        let out = mask(
            &["-----BEGIN KEY-----\nAAAABBBBCCCC\n-----END KEY-----"],
            &[b"x AAAABBBBCCCC y\n"],
        )
        .await;
        assert_eq!(out, "x [MASKED] y\n");
    }

    #[tokio::test]
    async fn masks_across_chunk_boundaries_byte_by_byte() {
        let text = b"token=hunter22 and again hunter22";
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let out = mask(&["hunter22"], &chunks).await;
        assert_eq!(out, "token=[MASKED] and again [MASKED]");
    }

    #[tokio::test]
    async fn holds_back_only_a_possible_prefix_and_flushes_it() {
        let values = vec!["secret".to_owned()];
        let patterns = patterns(&values);
        let sink = VecSink::default();
        let masking = MaskingSink::new(&sink, &patterns);
        masking.write(b"hello sec").await.unwrap();
        assert_eq!(sink.text(), "hello ");
        masking.write(b"ond\n").await.unwrap();
        assert_eq!(sink.text(), "hello second\n");
        masking.write(b"the end: se").await.unwrap();
        masking.flush().await.unwrap();
        assert_eq!(sink.text(), "hello second\nthe end: se");
    }

    #[tokio::test]
    async fn overlapping_secrets_are_masked_whole() {
        // Leftmost-first replacing masked `abcdef` and left `xyz` (the tail
        // of the second secret) in clear.
        let out = mask(&["abcdef", "defxyz"], &[b"1 abcdefxyz 2\n"]).await;
        assert_eq!(out, "1 [MASKED] 2\n");
        // The same, split at every byte: the part of the first secret that
        // is held back (it may start the second) stays masked when the
        // second does not follow.
        let text = b"1 abcdefxyz 2 abcdefxy!\n";
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let out = mask(&["abcdef", "defxyz"], &chunks).await;
        assert_eq!(out, "1 [MASKED] 2 [MASKED]xy!\n");
        // A secret inside another one's occurrence.
        let out = mask(&["hunter22", "nter"], &[b"a hunter22 nter b"]).await;
        assert_eq!(out, "a [MASKED] [MASKED] b");
    }

    /// What masking must give: every byte inside any occurrence masked,
    /// each run of masked bytes one [`MASK`] (whole text at once, brute force).
    fn reference(text: &[u8], patterns: &[Vec<u8>]) -> Vec<u8> {
        let mut masked = vec![false; text.len()];
        for p in patterns {
            for i in 0..text.len() {
                if text[i..].starts_with(p) {
                    masked[i..i + p.len()].iter_mut().for_each(|m| *m = true);
                }
            }
        }
        let mut out = Vec::new();
        for (i, &b) in text.iter().enumerate() {
            if !masked[i] {
                out.push(b);
            } else if i == 0 || !masked[i - 1] {
                out.extend_from_slice(MASK);
            }
        }
        out
    }

    #[tokio::test]
    async fn random_texts_secrets_and_chunks_mask_as_the_reference_does() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..400 {
            // A small alphabet, so secrets occur, overlap and abut often.
            let text: Vec<u8> = (0..next(80)).map(|_| b"abcd"[next(4) as usize]).collect();
            let values: Vec<String> = (0..1 + next(3))
                .map(|_| {
                    (0..3 + next(4))
                        .map(|_| ['a', 'b', 'c', 'd'][next(4) as usize])
                        .collect()
                })
                .collect();
            let pats = patterns(&values);
            let sink = VecSink::default();
            let masking = MaskingSink::new(&sink, &pats);
            let mut at = 0;
            while at < text.len() {
                let n = (1 + next(7) as usize).min(text.len() - at);
                masking.write(&text[at..at + n]).await.unwrap();
                at += n;
            }
            masking.flush().await.unwrap();
            let want = String::from_utf8(reference(&text, &pats)).unwrap();
            assert_eq!(
                sink.text(),
                want,
                "text {:?} secrets {values:?}",
                String::from_utf8_lossy(&text)
            );
        }
    }

    #[tokio::test]
    async fn no_secrets_passes_through() {
        assert_eq!(mask(&[], &[b"abc", b"def"]).await, "abcdef");
        // Too short to mask.
        assert_eq!(mask(&["ab"], &[b"abc"]).await, "abc");
    }
}
