//! Tests of the `keel` binary as a user runs it: child processes, signals, exit codes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod chaos;
mod cli;
mod cluster_up;
mod crash;
mod dashboards;
mod gateway;
mod grading;
mod haproxy;
mod limits;
mod readers;
mod replication;
mod sdk;
mod secure_cluster;
mod secure_up;
mod support;
mod up;
