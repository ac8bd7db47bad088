//! Generated protocol code, one module per proto package.
#![allow(clippy::all, missing_docs)]

pub mod pipeline {
    pub mod v1 {
        tonic::include_proto!("capstan.pipeline.v1");
    }
}
pub mod runner {
    pub mod v1 {
        tonic::include_proto!("capstan.runner.v1");
    }
}
pub mod api {
    pub mod v1 {
        tonic::include_proto!("capstan.api.v1");
    }
}
pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("capstan.cluster.v1");
    }
}
