//! The docker executor's built-in step kinds: [`build`] (an image from a
//! Dockerfile in the workspace) and [`push`] (to a registry with
//! credentials from a runner secret).

pub mod build;
pub mod push;
