//! OCI images for supermachine: resolving references (registry, OCI layout directory,
//! `docker save` archive), a content-addressed blob store that verifies every digest,
//! and the read-only root filesystem image (EROFS) built from the layer tars without
//! root.
//!
//! Everything read here (registry replies, manifests, tarballs) is hostile input:
//! errors, never panics, and nothing is written outside the store. This crate
//! must never depend on a hypervisor or the runner.
#![forbid(unsafe_code)]

pub mod erofs;
pub mod flatten;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod tar_guard;
