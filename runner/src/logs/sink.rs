//! The trait every stage of an attempt's log implements, and that
//! executors and built-in steps write a step's output to.
//!
//! The chain per step, built by the attempt: header ([`crate::attempt`]) ->
//! [`super::mask`] -> [`super::cap`] -> the [`super::spool`]'s writer.

use std::io;

use async_trait::async_trait;

/// Where a step's output goes (the attempt's log spool in the runner).
/// `write` returns once the bytes are stored.
#[async_trait]
pub trait OutputSink: Send + Sync {
    async fn write(&self, data: &[u8]) -> io::Result<()>;

    /// [`OutputSink::write`] of a buffer the caller gives up: a sink that
    /// keeps the bytes (the spool) takes it without a copy.
    async fn write_owned(&self, data: Vec<u8>) -> io::Result<()> {
        self.write(&data).await
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory sink for the tests of the stages and of the executors.
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct VecSink(pub(crate) Mutex<Vec<u8>>);

    impl VecSink {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
        pub(crate) fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl OutputSink for VecSink {
        async fn write(&self, data: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(())
        }
    }
}
