//! The CRI keychain: lazysnap serves the CRI image service on a socket of its own (kubelet's
//! `--image-service-endpoint`), forwards every call to containerd's byte for byte, and keeps the
//! credentials each PullImage carries (the pod's pull secrets) in a [`Keychain`] the registry
//! client consults, so the layers of a private image can be fetched lazily.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Status;
use tracing::Instrument as _;

use crate::containerd::proto::runtime::v1::{AuthConfig, PullImageRequest};
use crate::registry::{Credentials, Keychain, Reference};

/// The service whose calls are forwarded.
const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";

/// Why the CRI keychain could not start.
#[derive(Debug, thiserror::Error)]
pub enum CriKeychainError {
    #[error("CRI keychain: cannot listen on {socket}: {source} (set cri_keychain.listen_path)")]
    Listen {
        socket: String,
        source: std::io::Error,
    },
    #[error("CRI keychain: serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves the forwarding image service on `listen` until `shutdown` completes.
pub async fn serve(
    listen: &Path,
    containerd: &Path,
    keychain: Arc<Keychain>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CriKeychainError> {
    // Connected at the first call: lazysnap starts before containerd.
    let path = containerd.to_path_buf();
    let upstream = tonic::transport::Endpoint::from_static("http://containerd.sock")
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }));
    let listener = bind(listen)?;
    tracing::info!(socket = %listen.display(), containerd = %containerd.display(), "CRI image service with keychain serving");
    let proxy = ImageServiceProxy { upstream, keychain };
    tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

fn bind(path: &Path) -> Result<UnixListener, CriKeychainError> {
    let failed = |source| CriKeychainError::Listen {
        socket: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    // A socket left by a previous run; a live one would have refused the root lock earlier.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(failed)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(failed)?;
    Ok(listener)
}

/// The credentials a PullImage carries, if any, for the image it names.
fn credentials_of(request: &PullImageRequest) -> Option<(Reference, Credentials)> {
    let image = request.image.as_ref()?.image.as_str();
    let auth = request.auth.as_ref()?;
    let credentials = credentials_from(auth)?;
    match Reference::parse(image) {
        Ok(reference) => Some((reference, credentials)),
        Err(err) => {
            tracing::warn!(image, error = %err, "CRI pull of an image lazysnap cannot parse: its credentials are not kept");
            None
        }
    }
}

fn credentials_from(auth: &AuthConfig) -> Option<Credentials> {
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Some(Credentials::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok());
        match decoded.as_deref().and_then(|pair| pair.split_once(':')) {
            Some((username, password)) => {
                return Some(Credentials::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                })
            }
            None => tracing::warn!(
                "CRI pull credentials: `auth` is not base64 of user:password; ignored"
            ),
        }
    }
    if !auth.identity_token.is_empty() {
        return Some(Credentials::IdentityToken(auth.identity_token.clone()));
    }
    if !auth.registry_token.is_empty() {
        tracing::warn!("CRI pull credentials: a registry_token is not kept (use username/password or an identity token)");
    }
    None
}

/// Forwards `runtime.v1.ImageService` calls to containerd, learning credentials on the way.
#[derive(Clone)]
struct ImageServiceProxy {
    upstream: Channel,
    keychain: Arc<Keychain>,
}

impl tonic::server::NamedService for ImageServiceProxy {
    const NAME: &'static str = IMAGE_SERVICE;
}

impl<B> tower::Service<http::Request<B>> for ImageServiceProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let forward = Forward {
            proxy: self.clone(),
            method: request.uri().path().to_string(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(forward, request).await)
        })
    }
}

/// One call, forwarded as it came.
struct Forward {
    proxy: ImageServiceProxy,
    method: String,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        let method = self.method.clone();
        let span = tracing::info_span!("cri.forward", method = %method);
        Box::pin(
            async move {
            if method == PULL_IMAGE {
                match PullImageRequest::decode(request.get_ref().clone()) {
                    Ok(pull) => {
                        if let Some((reference, credentials)) = credentials_of(&pull) {
                            tracing::info!(image = %reference, "keeping the credentials of a CRI pull");
                            proxy.keychain.remember(&reference, credentials);
                        }
                    }
                    Err(err) => {
                        return Err(Status::invalid_argument(format!(
                            "PullImageRequest does not decode: {err}"
                        )))
                    }
                }
            }
            let path = http::uri::PathAndQuery::try_from(method.as_str())
                .map_err(|e| Status::unimplemented(format!("{method}: {e}")))?;
            let mut client = tonic::client::Grpc::new(proxy.upstream.clone());
            client
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("containerd's image service: {e}")))?;
            client.unary(request, path, RawCodec).await
            }
            .instrument(span),
        )
    }
}

/// Messages as their encoded bytes: forwarded without decoding, so every field reaches the
/// other side.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::proto::runtime::v1::ImageSpec;

    fn pull(auth: AuthConfig) -> PullImageRequest {
        PullImageRequest {
            image: Some(ImageSpec {
                image: "reg.example:5000/team/app:v1".into(),
                ..Default::default()
            }),
            auth: Some(auth),
        }
    }

    #[test]
    fn pull_credentials_come_from_user_and_password_or_auth_or_an_identity_token() {
        let (reference, credentials) = credentials_of(&pull(AuthConfig {
            username: "alice".into(),
            password: "pw".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(reference.repository, "team/app");
        assert!(matches!(credentials, Credentials::Basic { username, .. } if username == "alice"));
        let (_, credentials) = credentials_of(&pull(AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:secret"),
            ..Default::default()
        }))
        .unwrap();
        assert!(
            matches!(credentials, Credentials::Basic { username, password } if username == "bob" && password == "secret")
        );
        let (_, credentials) = credentials_of(&pull(AuthConfig {
            identity_token: "refresh".into(),
            ..Default::default()
        }))
        .unwrap();
        assert!(matches!(credentials, Credentials::IdentityToken(_)));
        assert!(credentials_of(&pull(AuthConfig::default())).is_none());
    }
}
