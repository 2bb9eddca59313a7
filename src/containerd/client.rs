//! A containerd gRPC client over its unix socket: every request carries the namespace (and the
//! lease, when one is held) as containerd's metadata headers. Thin typed wrappers for the calls
//! `lazysnap pull` makes on the content, images, leases, diff and snapshots services.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};
use tracing::Instrument;

use super::proto::images::images_client::ImagesClient;
use super::proto::images::{CreateImageRequest, GetImageRequest, Image, UpdateImageRequest};
use super::proto::leases::leases_client::LeasesClient;
use super::proto::leases::{CreateRequest, DeleteRequest};
use super::proto::Descriptor;
use super::ContainerdError;
use crate::labels;

mod content;
mod snapshots;
pub use content::WriteOutcome;
pub use snapshots::Prepared;

/// gRPC metadata header naming the containerd namespace of a request.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata header naming the lease that protects what a request creates.
pub const LEASE_HEADER: &str = "containerd-lease";

/// A connection to one containerd, bound to a namespace and optionally a lease. Cloning is cheap
/// (the channel is shared).
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    /// Connects to containerd's gRPC socket and binds requests to `namespace`.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        if namespace.is_empty()
            || MetadataValue::try_from(namespace).is_err()
            || namespace.len() > 76
        {
            return Err(ContainerdError::Invalid {
                what: "namespace".to_string(),
                detail: format!(
                    "{namespace:?} is not a containerd namespace (letters, digits, '.', '_', '-'; \
                     at most 76 characters)"
                ),
            });
        }
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector always dials the unix socket.
        let channel = Endpoint::from_static("http://containerd.sock")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|err| ContainerdError::Connect {
                socket: socket.display().to_string(),
                detail: error_chain(&err),
            })?;
        Ok(Self {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    /// The gRPC channel, for services this client has no wrapper for (e.g. CRI's
    /// `runtime.v1.ImageService`, which needs no namespace header).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace requests are bound to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A client whose requests also carry `lease`, so everything they create is protected from
    /// garbage collection until the lease is deleted.
    pub fn with_lease(&self, lease: &str) -> Self {
        Self {
            lease: Some(lease.to_string()),
            ..self.clone()
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        // Both values were validated as header values when set (namespace in connect, lease ids
        // come from containerd).
        if let Ok(value) = MetadataValue::try_from(self.namespace.as_str()) {
            metadata.insert(NAMESPACE_HEADER, value);
        }
        if let Some(lease) = &self.lease {
            if let Ok(value) = MetadataValue::try_from(lease.as_str()) {
                metadata.insert(LEASE_HEADER, value);
            }
        }
        request
    }

    /// Creates a lease that expires by itself after `expire` (in case this process dies) and
    /// returns its id.
    pub async fn create_lease(&self, expire: Duration) -> Result<String, ContainerdError> {
        let expire_at = SystemTime::now() + expire;
        let mut lease_labels = HashMap::new();
        lease_labels.insert(labels::GC_EXPIRE.to_string(), rfc3339(expire_at));
        let response = LeasesClient::new(self.channel.clone())
            .create(self.request(CreateRequest {
                id: String::new(),
                labels: lease_labels,
            }))
            .instrument(tracing::debug_span!("containerd.leases.create"))
            .await
            .map_err(rpc_error("Leases.Create", "new lease"))?
            .into_inner();
        let id = response.lease.map(|lease| lease.id).unwrap_or_default();
        if id.is_empty() || MetadataValue::try_from(id.as_str()).is_err() {
            return Err(ContainerdError::Protocol(format!(
                "Leases.Create returned an unusable lease id {id:?}"
            )));
        }
        Ok(id)
    }

    /// Deletes a lease; what it protected becomes collectable unless something else references it.
    pub async fn delete_lease(&self, id: &str) -> Result<(), ContainerdError> {
        LeasesClient::new(self.channel.clone())
            .delete(self.request(DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .instrument(tracing::debug_span!("containerd.leases.delete", lease = id))
            .await
            .map_err(rpc_error("Leases.Delete", id))?;
        Ok(())
    }

    /// Creates image record `name` pointing at `target`, or updates it if it exists.
    pub async fn create_or_update_image(
        &self,
        name: &str,
        target: Descriptor,
        image_labels: HashMap<String, String>,
    ) -> Result<(), ContainerdError> {
        let image = Image {
            name: name.to_string(),
            labels: image_labels,
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel.clone());
        let created = images
            .create(self.request(CreateImageRequest {
                image: Some(image.clone()),
            }))
            .instrument(tracing::debug_span!("containerd.images.create", name))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                images
                    .update(self.request(UpdateImageRequest {
                        image: Some(image),
                        // Empty mask: replace target and labels.
                        update_mask: None,
                    }))
                    .instrument(tracing::debug_span!("containerd.images.update", name))
                    .await
                    .map_err(rpc_error("Images.Update", name))?;
                Ok(())
            }
            Err(status) => Err(rpc_error("Images.Create", name)(status)),
        }
    }

    /// The image record `name`, or `None` if containerd has no such image.
    pub async fn get_image(&self, name: &str) -> Result<Option<Image>, ContainerdError> {
        let result = ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest {
                name: name.to_string(),
            }))
            .instrument(tracing::debug_span!("containerd.images.get", name))
            .await;
        match result {
            Ok(response) => Ok(response.into_inner().image),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc_error("Images.Get", name)(status)),
        }
    }
}

/// Maps a gRPC status into an error naming the call and what it was about.
pub(crate) fn rpc_error(call: &'static str, what: &str) -> impl FnOnce(Status) -> ContainerdError {
    let what = what.to_string();
    move |status| ContainerdError::Rpc {
        call,
        what,
        code: status.code(),
        message: status.message().to_string(),
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `time` as RFC 3339 UTC with whole seconds (`2024-01-02T03:04:05Z`), the form containerd's
/// `containerd.io/gc.expire` label takes.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// days-to-civil algorithm, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }
}
