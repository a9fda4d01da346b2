//! Fitting a connection limit under the process's limit on open files, so that a
//! server at its connection limit still has descriptors for its own files and for
//! the next client, instead of failing every accept with `EMFILE`.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft limit on open files to the hard limit (as the Go runtime does),
/// then returns `max` or, when fewer fit, the connections that fit below the limit
/// (at least one), with a warning that names `what` and the limit. Each connection
/// takes `per_connection` descriptors (a proxy's takes two: the client's and the
/// upstream's); `reserve` are kept for everything else, but never more than half.
pub fn connections_within_fd_limit(
    max: usize,
    per_connection: usize,
    reserve: usize,
    what: &str,
) -> usize {
    let limit = raise_soft_limit();
    let Some(limit) = limit else {
        return max;
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let fit = (limit.saturating_sub(reserve.min(limit / 2)) / per_connection.max(1)).max(1);
    if fit < max {
        tracing::warn!(
            what,
            max_connections = max,
            open_files_limit = limit,
            reserved = reserve,
            connections = fit,
            "the open-files limit (ulimit -n) leaves room for fewer connections than max_connections: serving at most {fit}; raise the limit to serve more"
        );
        return fit;
    }
    max
}

/// The soft limit on open files after raising it to the hard limit; `None` when
/// unlimited or unknown.
fn raise_soft_limit() -> Option<u64> {
    let current = getrlimit(Resource::Nofile);
    if current.current < current.maximum {
        let raised = Rlimit {
            current: current.maximum,
            maximum: current.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %err, "cannot raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_should_never_be_raised_above_what_fits_nor_below_one() {
        let Some(limit) = raise_soft_limit().map(|n| n as usize) else {
            return; // unlimited: nothing to fit
        };
        assert_eq!(connections_within_fd_limit(10, 1, 0, "test"), 10.min(limit));
        assert_eq!(
            connections_within_fd_limit(usize::MAX, 2, usize::MAX, "test"),
            (limit - limit / 2) / 2,
            "the reserve takes half at most"
        );
    }
}
