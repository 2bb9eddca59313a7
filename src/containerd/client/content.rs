//! containerd's content store through its API: labels of blobs, and writing a blob with
//! resumable, digest-checked streaming writes.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::containerd::proto::content::content_client::ContentClient;
use crate::containerd::proto::content::{
    InfoRequest, UpdateRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use crate::containerd::ContainerdError;

use super::{rpc_error, Containerd};

/// Bytes sent per content Write message (containerd accepts up to 16 MiB per message).
pub(super) const WRITE_CHUNK: usize = 1024 * 1024;

/// What happened to a content write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The bytes were written and committed under the expected digest.
    Written,
    /// containerd already had the digest; only its labels were updated.
    AlreadyPresent,
}

/// One bidirectional content Write stream: requests out, one response back per request.
pub(super) struct WriteExchange<'a> {
    pub(super) sender: tokio::sync::mpsc::Sender<WriteContentRequest>,
    pub(super) responses: &'a mut tonic::Streaming<WriteContentResponse>,
    pub(super) digest: &'a str,
}

impl WriteExchange<'_> {
    pub(super) async fn send(
        &mut self,
        request: WriteContentRequest,
    ) -> Result<(), ContainerdError> {
        if self.sender.send(request).await.is_ok() {
            return Ok(());
        }
        // The request stream is gone: containerd ended the call; its status says why.
        match self.responses.message().await {
            Err(status) => Err(rpc_error("Content.Write", self.digest)(status)),
            Ok(_) => Err(ContainerdError::Protocol(format!(
                "containerd closed the content write of {} early",
                self.digest
            ))),
        }
    }

    /// The next response; `Err(Ok(status))` carries containerd's error status so callers can
    /// react to AlreadyExists.
    pub(super) async fn next_response(
        &mut self,
    ) -> Result<WriteContentResponse, Result<Status, ContainerdError>> {
        match self.responses.message().await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(Err(ContainerdError::Protocol(format!(
                "containerd ended the content write of {} without an answer",
                self.digest
            )))),
            Err(status) => Err(Ok(status)),
        }
    }
}

pub(super) fn flatten(err: Result<Status, ContainerdError>, digest: &str) -> ContainerdError {
    match err {
        Ok(status) => rpc_error("Content.Write", digest)(status),
        Err(err) => err,
    }
}

impl Containerd {
    /// Labels of a blob in the content store, or `None` if containerd does not have it.
    pub async fn content_labels(
        &self,
        digest: &str,
    ) -> Result<Option<HashMap<String, String>>, ContainerdError> {
        let result = ContentClient::new(self.channel.clone())
            .info(self.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .instrument(tracing::debug_span!("containerd.content.info", digest))
            .await;
        match result {
            Ok(response) => Ok(Some(
                response
                    .into_inner()
                    .info
                    .map(|info| info.labels)
                    .unwrap_or_default(),
            )),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc_error("Content.Info", digest)(status)),
        }
    }

    /// Sets (adds or replaces) `new_labels` on a blob in the content store, keeping its others.
    pub async fn update_content_labels(
        &self,
        digest: &str,
        new_labels: &HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        if new_labels.is_empty() {
            return Ok(());
        }
        let paths = new_labels
            .keys()
            .map(|key| format!("labels.{key}"))
            .collect();
        ContentClient::new(self.channel.clone())
            .update(self.request(UpdateRequest {
                info: Some(crate::containerd::proto::content::Info {
                    digest: digest.to_string(),
                    labels: new_labels.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .instrument(tracing::debug_span!("containerd.content.update", digest))
            .await
            .map_err(rpc_error("Content.Update", digest))?;
        Ok(())
    }

    /// Streams `data` into the content store under `digest` (size `size`), verified by containerd
    /// against both, and commits it with `content_labels`. If containerd already has the digest,
    /// nothing is written (the stream is not polled) and the labels are added to the existing blob.
    /// `on_bytes` is told how many bytes each written message carried.
    pub async fn write_content<S, E>(
        &self,
        digest: &str,
        size: u64,
        content_labels: HashMap<String, String>,
        data: S,
        mut on_bytes: impl FnMut(u64) + Send,
    ) -> Result<WriteOutcome, ContainerdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let span = tracing::debug_span!("containerd.content.write", digest, size);
        async move {
            let total = i64::try_from(size).map_err(|_| ContainerdError::Invalid {
                what: format!("blob {digest}"),
                detail: format!("size {size} does not fit containerd's int64"),
            })?;
            let reference = format!("lazysnap-{digest}");
            let (sender, receiver) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
            // The first message opens (or resumes) the ingest and sets what it must end up as;
            // containerd answers AlreadyExists right away if it has the digest.
            let opening = WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                ..Default::default()
            };
            sender
                .send(opening)
                .await
                .map_err(|_| ContainerdError::Protocol("content write stream closed".into()))?;
            let call = ContentClient::new(self.channel.clone())
                .write(self.request(tokio_stream::wrappers::ReceiverStream::new(receiver)))
                .await;
            let mut responses = match call {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    return Ok(WriteOutcome::AlreadyPresent);
                }
                Err(status) => return Err(rpc_error("Content.Write", digest)(status)),
            };
            let mut exchange = WriteExchange {
                sender,
                responses: &mut responses,
                digest,
            };
            match exchange.next_response().await {
                Ok(_) => {}
                Err(Ok(status)) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    return Ok(WriteOutcome::AlreadyPresent);
                }
                Err(err) => return Err(flatten(err, digest)),
            }
            // Always start at offset 0: containerd drops any bytes a previous, interrupted
            // write of the same ref left behind.
            let mut offset: u64 = 0;
            let mut pending = BytesMut::new();
            let data = data.fuse();
            futures::pin_mut!(data);
            loop {
                let next = data.next().await;
                let finished = next.is_none();
                if let Some(item) = next {
                    let bytes = item.map_err(|err| {
                        ContainerdError::Source(format!("reading blob {digest}: {err}"))
                    })?;
                    pending.extend_from_slice(&bytes);
                }
                while pending.len() >= WRITE_CHUNK || (finished && !pending.is_empty()) {
                    let take = pending.len().min(WRITE_CHUNK);
                    let chunk = pending.split_to(take).freeze();
                    let chunk_len = chunk.len() as u64;
                    let end = offset.saturating_add(chunk_len);
                    if end > size {
                        return Err(ContainerdError::Source(format!(
                            "blob {digest} is longer than the {size} bytes its descriptor says"
                        )));
                    }
                    exchange
                        .send(WriteContentRequest {
                            action: WriteAction::Write as i32,
                            offset: offset as i64,
                            data: chunk.to_vec(),
                            ..Default::default()
                        })
                        .await?;
                    let answer = exchange
                        .next_response()
                        .await
                        .map_err(|err| flatten(err, digest))?;
                    if u64::try_from(answer.offset).ok() != Some(end) {
                        return Err(ContainerdError::Protocol(format!(
                            "containerd acknowledged blob {digest} up to offset {} after a write \
                             ending at {end}",
                            answer.offset
                        )));
                    }
                    offset = end;
                    on_bytes(chunk_len);
                }
                if finished {
                    break;
                }
            }
            if offset != size {
                return Err(ContainerdError::Source(format!(
                    "blob {digest} ended after {offset} bytes, its descriptor says {size}"
                )));
            }
            exchange
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    total,
                    expected: digest.to_string(),
                    offset: offset as i64,
                    labels: content_labels.clone(),
                    ..Default::default()
                })
                .await?;
            match exchange.next_response().await {
                Ok(answer) => {
                    if !answer.digest.is_empty() && answer.digest != digest {
                        return Err(ContainerdError::Protocol(format!(
                            "containerd committed {} while {digest} was expected",
                            answer.digest
                        )));
                    }
                    Ok(WriteOutcome::Written)
                }
                // Someone else committed the same digest meanwhile.
                Err(Ok(status)) if status.code() == Code::AlreadyExists => {
                    self.update_content_labels(digest, &content_labels).await?;
                    Ok(WriteOutcome::AlreadyPresent)
                }
                Err(err) => Err(flatten(err, digest)),
            }
        }
        .instrument(span)
        .await
    }
}
