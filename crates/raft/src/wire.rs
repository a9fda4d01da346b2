//! Conversions between openraft's types and the messages of `keel.raft.v1`.

use bytes::Bytes;
use keel_proto::raft::v1 as pb;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};

use crate::codec;
use crate::error::RaftStoreError;
use crate::{LogId, TypeConfig, Vote};

pub(crate) fn log_id_to(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        node_id: id.leader_id.node_id,
        index: id.index,
    }
}

pub(crate) fn log_id_from(id: &pb::LogId) -> LogId {
    LogId::new(
        openraft::CommittedLeaderId::new(id.term, id.node_id),
        id.index,
    )
}

pub(crate) fn vote_to(vote: &Vote) -> pb::Vote {
    pb::Vote {
        term: vote.leader_id.term,
        node_id: vote.leader_id.node_id,
        committed: vote.committed,
    }
}

pub(crate) fn vote_from(vote: &pb::Vote) -> Vote {
    if vote.committed {
        Vote::new_committed(vote.term, vote.node_id)
    } else {
        Vote::new(vote.term, vote.node_id)
    }
}

pub(crate) fn append_request_to(
    rpc: &AppendEntriesRequest<TypeConfig>,
) -> Result<pb::AppendRequest, RaftStoreError> {
    let entries = rpc
        .entries
        .iter()
        .map(|entry| codec::to_bytes(entry).map(Bytes::from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pb::AppendRequest {
        vote: Some(vote_to(&rpc.vote)),
        prev_log_id: rpc.prev_log_id.as_ref().map(log_id_to),
        leader_commit: rpc.leader_commit.as_ref().map(log_id_to),
        entries,
    })
}

pub(crate) fn append_request_from(
    request: pb::AppendRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, RaftStoreError> {
    let vote =
        request.vote.as_ref().map(vote_from).ok_or_else(|| {
            RaftStoreError::BadMessage("an append request without a vote".to_owned())
        })?;
    let entries = request
        .entries
        .into_iter()
        .map(codec::decode_any)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id: request.prev_log_id.as_ref().map(log_id_from),
        leader_commit: request.leader_commit.as_ref().map(log_id_from),
        entries,
    })
}

pub(crate) fn append_response_to(response: &AppendEntriesResponse<u64>) -> pb::AppendResponse {
    use pb::append_response::Result as R;
    let result = match response {
        AppendEntriesResponse::Success => R::Success(true),
        AppendEntriesResponse::PartialSuccess(matched) => R::Partial(pb::PartialSuccess {
            matched: matched.as_ref().map(log_id_to),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(true),
        AppendEntriesResponse::HigherVote(vote) => R::HigherVote(vote_to(vote)),
    };
    pb::AppendResponse {
        result: Some(result),
    }
}

pub(crate) fn append_response_from(
    response: &pb::AppendResponse,
) -> Option<AppendEntriesResponse<u64>> {
    use pb::append_response::Result as R;
    Some(match response.result.as_ref()? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::Partial(partial) => {
            AppendEntriesResponse::PartialSuccess(partial.matched.as_ref().map(log_id_from))
        }
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(vote) => AppendEntriesResponse::HigherVote(vote_from(vote)),
    })
}
