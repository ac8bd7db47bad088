//! The per-step log cap (DESIGN, "Logs"): a step may write at most `cap`
//! bytes to the log. Past that, the log keeps the step's first bytes and
//! its last [`StepLogCap::tail`] bytes, and says how much it dropped in
//! between, so truncation is visible and never silent.
//!
//! The first `cap - tail` bytes stream live. What comes after is held back
//! in a ring of `tail` bytes (a line says so when it starts), and written
//! when the step ends, after a line that counts what was dropped. A step
//! that stays under the cap is not held back at all.
//!
//! The cap sits after masking, so everything it keeps is masked.

use std::collections::VecDeque;
use std::io;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::sink::OutputSink;

/// Default cap of one step's log: a step that writes more is almost always
/// a runaway loop or a debug flag left on, and its log would crowd the
/// coordinator's disk.
pub const DEFAULT_STEP_LOG_CAP: u64 = 256 * 1024 * 1024;
/// Largest tail kept of a capped step (held in memory until the step ends).
pub const MAX_TAIL: u64 = 4 * 1024 * 1024;

/// How much of a step's output the log keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLogCap {
    /// Most bytes of one step's output in the log (0: no cap).
    pub cap: u64,
}

impl Default for StepLogCap {
    fn default() -> Self {
        Self {
            cap: DEFAULT_STEP_LOG_CAP,
        }
    }
}

impl StepLogCap {
    /// Bytes kept from the end of a capped step: a quarter of the cap, at
    /// most [`MAX_TAIL`].
    pub fn tail(self) -> u64 {
        (self.cap / 4).min(MAX_TAIL)
    }

    /// Bytes that stream live before the rest is held back.
    pub fn head(self) -> u64 {
        self.cap - self.tail()
    }
}

/// An [`OutputSink`] that applies a [`StepLogCap`] to what it passes to
/// `inner`. Call [`CappedSink::finish`] when the step ends.
pub struct CappedSink<'a> {
    inner: &'a dyn OutputSink,
    cap: StepLogCap,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes passed on live.
    streamed: u64,
    /// The last bytes past the head, at most `tail` of them.
    held: VecDeque<u8>,
    /// Bytes that fell out of `held`.
    dropped: u64,
    /// The held-back line was written.
    noted: bool,
}

impl<'a> CappedSink<'a> {
    pub fn new(inner: &'a dyn OutputSink, cap: StepLogCap) -> Self {
        Self {
            inner,
            cap,
            state: Mutex::new(State::default()),
        }
    }

    /// Writes what was held back, after a line saying what was dropped.
    pub async fn finish(&self) -> io::Result<()> {
        let mut st = self.state.lock().await;
        if st.held.is_empty() && st.dropped == 0 {
            return Ok(());
        }
        if st.dropped > 0 {
            let note = format!(
                "\n[capstan: {} bytes of this step's output were dropped here: the log keeps the first {} and the last {} bytes of a step (runner --max-step-log {})]\n",
                st.dropped,
                self.cap.head(),
                self.cap.tail(),
                self.cap.cap
            );
            self.inner.write(note.as_bytes()).await?;
        }
        let held: Vec<u8> = std::mem::take(&mut st.held).into();
        self.inner.write_owned(held).await
    }

    async fn hold(&self, st: &mut State, data: &[u8]) -> io::Result<()> {
        if !st.noted {
            st.noted = true;
            let note = format!(
                "\n[capstan: this step wrote more than {} bytes; the rest is held back and its last {} bytes are shown when the step ends]\n",
                self.cap.head(),
                self.cap.tail()
            );
            self.inner.write(note.as_bytes()).await?;
        }
        let tail = usize::try_from(self.cap.tail()).unwrap_or(usize::MAX);
        // Only the last `tail` bytes of `data` can survive.
        let keep = &data[data.len().saturating_sub(tail)..];
        st.dropped += (data.len() - keep.len()) as u64;
        let overflow = (st.held.len() + keep.len()).saturating_sub(tail);
        st.held.drain(..overflow);
        st.dropped += overflow as u64;
        st.held.extend(keep);
        Ok(())
    }

    /// How many of the next `len` bytes stream live (counted as streamed);
    /// the rest is held back.
    fn live(&self, st: &mut State, len: usize) -> usize {
        if self.cap.cap == 0 {
            return len;
        }
        let room = usize::try_from(self.cap.head().saturating_sub(st.streamed))
            .unwrap_or(usize::MAX)
            .min(len);
        st.streamed += room as u64;
        room
    }
}

#[async_trait]
impl OutputSink for CappedSink<'_> {
    async fn write(&self, data: &[u8]) -> io::Result<()> {
        // Held across the writes below: output keeps its order.
        let mut st = self.state.lock().await;
        let live = self.live(&mut st, data.len());
        if live > 0 {
            self.inner.write(&data[..live]).await?;
        }
        if live < data.len() {
            self.hold(&mut st, &data[live..]).await?;
        }
        Ok(())
    }

    async fn write_owned(&self, data: Vec<u8>) -> io::Result<()> {
        let mut st = self.state.lock().await;
        let live = self.live(&mut st, data.len());
        if live == data.len() {
            // Under the cap (the usual case): handed on without a copy.
            return self.inner.write_owned(data).await;
        }
        if live > 0 {
            self.inner.write(&data[..live]).await?;
        }
        self.hold(&mut st, &data[live..]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::sink::testing::VecSink;

    async fn capped(cap: u64, writes: &[&[u8]]) -> String {
        let sink = VecSink::default();
        let capped = CappedSink::new(&sink, StepLogCap { cap });
        for w in writes {
            capped.write(w).await.unwrap();
        }
        capped.finish().await.unwrap();
        sink.text()
    }

    #[tokio::test]
    async fn under_the_cap_nothing_is_dropped() {
        assert_eq!(capped(100, &[b"hello ", b"world"]).await, "hello world");
        // Past the head (9 of 11) the rest waits for the step's end, with a
        // line saying so, but nothing is dropped.
        let log = capped(11, &[b"hello ", b"world"]).await;
        assert!(log.starts_with("hello wor\n[capstan: "), "{log}");
        assert!(log.ends_with("]\nld") && !log.contains("dropped"), "{log}");
        assert_eq!(capped(0, &[&[b'x'; 1000]]).await.len(), 1000, "0: no cap");
        // A cap too small for a tail: one held-back line, one dropped line.
        let log = capped(2, &[b"ab", b"cd", b"ef"]).await;
        assert_eq!(log.matches("[capstan:").count(), 2, "{log}");
        assert!(log.starts_with("ab\n") && log.contains("4 bytes"), "{log}");
    }

    #[tokio::test]
    async fn over_the_cap_keeps_head_and_tail_and_counts_the_rest() {
        // cap 40: tail 10, head 30.
        let cap = StepLogCap { cap: 40 };
        assert_eq!((cap.head(), cap.tail()), (30, 10));
        let out: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        let log = capped(40, &[&out[..25], &out[25..60], &out[60..]]).await;
        let head = String::from_utf8(out[..30].to_vec()).unwrap();
        let tail = String::from_utf8(out[90..].to_vec()).unwrap();
        assert!(log.starts_with(&head), "{log}");
        assert!(log.ends_with(&tail), "{log}");
        assert!(
            log.contains("more than 30 bytes; the rest is held back"),
            "{log}"
        );
        assert!(
            log.contains("60 bytes of this step's output were dropped"),
            "{log}"
        );
        assert!(log.contains("--max-step-log 40"), "{log}");
    }

    #[tokio::test]
    async fn just_past_the_head_drops_nothing() {
        let out = [b'Z'; 35];
        let log = capped(40, &[&out]).await;
        assert!(!log.contains("dropped"), "{log}");
        assert_eq!(log.matches('Z').count(), 35, "{log}");
    }

    #[tokio::test]
    async fn one_huge_write_and_owned_writes() {
        let sink = VecSink::default();
        let capped = CappedSink::new(&sink, StepLogCap { cap: 1000 });
        capped.write_owned(vec![b'Z'; 10_000]).await.unwrap();
        capped.write_owned(b"END".to_vec()).await.unwrap();
        capped.finish().await.unwrap();
        let log = sink.text();
        assert!(log.ends_with("END"), "{log}");
        assert!(
            log.contains("9003 bytes of this step's output were dropped"),
            "{log}"
        );
        assert_eq!(log.matches('Z').count(), 750 + 247, "{log}");
    }
}
