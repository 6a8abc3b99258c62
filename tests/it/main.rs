//! One integration-test binary (one link, shared build) for every suite.

mod access;
mod audit;
mod coaching;
mod common;
mod crash;
mod faults;
mod grpc;
mod loadgen;
mod ops;
mod postgres;
mod process;
mod replicas;
mod retention;
mod rotation;
mod s3;
mod vectors;
mod web;
