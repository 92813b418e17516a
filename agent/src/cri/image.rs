//! The CRI ImageService, over the image store of `isola-images` (`Runtime::images`,
//! opened in `server::run` under `<root>/images` with the `[registry]` settings).

use std::collections::HashMap;
use std::sync::Arc;

use isola_images::{Credentials, ImageRecord};
use isola_proto::cri;
use isola_proto::cri::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use super::{traced, CriError, Kind};
use crate::runtime::{now_ns, Runtime};

/// The CRI ImageService.
#[derive(Clone)]
pub struct ImageServer {
    rt: Arc<Runtime>,
}

impl ImageServer {
    /// A server over `rt`.
    pub fn new(rt: Arc<Runtime>) -> ImageServer {
        ImageServer { rt }
    }
}

/// The CRI `Image` message of a record, as kubelet reads it.
pub fn to_cri_image(i: &ImageRecord) -> cri::Image {
    cri::Image {
        id: i.id.clone(),
        repo_tags: i.repo_tags.clone(),
        repo_digests: i.repo_digests.clone(),
        size: i.size,
        uid: i.uid.map(|value| cri::Int64Value { value }),
        username: i.username.clone(),
        spec: Some(cri::ImageSpec {
            image: i.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// The verbose `info` of ImageStatus: `info["info"]` is a JSON object holding the image
/// config as pulled (`imageSpec`, as containerd names it), the chain ids and the
/// manifest digest.
fn verbose_info(i: &ImageRecord) -> Result<HashMap<String, String>, CriError> {
    let spec: serde_json::Value = serde_json::from_str(&i.config_json)
        .map_err(|e| CriError::Internal(format!("image {} config: {e}", i.id)))?;
    let info = serde_json::json!({
        "imageSpec": spec,
        "chainIDs": i.chain_ids,
        "manifestDigest": i.manifest_digest,
        "layerDigests": i.layer_digests,
    });
    Ok(HashMap::from([("info".to_string(), info.to_string())]))
}

fn image_name(spec: Option<&cri::ImageSpec>, field: &str) -> Result<String, CriError> {
    let name = spec.map(|s| s.image.trim()).unwrap_or_default();
    if name.is_empty() {
        return Err(CriError::InvalidArgument(format!(
            "{field} must not be empty"
        )));
    }
    Ok(name.to_string())
}

fn credentials(auth: Option<cri::AuthConfig>) -> Option<Credentials> {
    auth.map(|a| Credentials {
        username: a.username,
        password: a.password,
        auth: a.auth,
        identity_token: a.identity_token,
        registry_token: a.registry_token,
    })
}

impl Runtime {
    /// PullImage: fetch, verify, unpack, record; answers the image id.
    pub async fn pull_image(
        &self,
        req: cri::PullImageRequest,
    ) -> Result<cri::PullImageResponse, CriError> {
        let name = image_name(req.image.as_ref(), "image.image")?;
        let img = self.images.pull(&name, credentials(req.auth)).await?;
        Ok(cri::PullImageResponse { image_ref: img.id })
    }

    /// ImageStatus: the image, or none (not an error) when nothing has that name.
    pub async fn image_status(
        &self,
        req: cri::ImageStatusRequest,
    ) -> Result<cri::ImageStatusResponse, CriError> {
        let name = image_name(req.image.as_ref(), "image.image")?;
        let Some(img) = self.images.status(&name)? else {
            return Ok(cri::ImageStatusResponse::default());
        };
        let info = if req.verbose {
            verbose_info(&img)?
        } else {
            HashMap::new()
        };
        Ok(cri::ImageStatusResponse {
            image: Some(to_cri_image(&img)),
            info,
        })
    }

    /// ListImages, optionally only the image the filter names.
    pub async fn list_images(
        &self,
        req: cri::ListImagesRequest,
    ) -> Result<cri::ListImagesResponse, CriError> {
        let filter = req
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.trim().is_empty());
        let mut images = self.images.list(filter.as_deref())?;
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cri::ListImagesResponse {
            images: images.iter().map(to_cri_image).collect(),
        })
    }

    /// RemoveImage: idempotent; layers in use by containers stay until they go.
    pub async fn remove_image(
        &self,
        req: cri::RemoveImageRequest,
    ) -> Result<cri::RemoveImageResponse, CriError> {
        let name = image_name(req.image.as_ref(), "image.image")?;
        self.images.remove(&name).await?;
        Ok(cri::RemoveImageResponse {})
    }

    /// ImageFsInfo: what the image store uses. Containers' writable layers live in the
    /// same store, so `container_filesystems` reports the same file system.
    pub async fn image_fs_info(&self) -> Result<cri::ImageFsInfoResponse, CriError> {
        let u = self.images.fs_info().await?;
        let usage = cri::FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: u.path.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value {
                value: u.used_bytes,
            }),
            inodes_used: Some(cri::UInt64Value {
                value: u.inodes_used,
            }),
        };
        Ok(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage.clone()],
            container_filesystems: vec![usage],
        })
    }
}

#[tonic::async_trait]
impl ImageService for ImageServer {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let r = request.into_inner();
        traced("ListImages", Kind::Read, "", self.rt.list_images(r)).await
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let r = request.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        traced("ImageStatus", Kind::Read, &id, self.rt.image_status(r)).await
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = request.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        traced("PullImage", Kind::Mutating, &id, self.rt.pull_image(r)).await
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let r = request.into_inner();
        let id = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        traced("RemoveImage", Kind::Mutating, &id, self.rt.remove_image(r)).await
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        traced("ImageFsInfo", Kind::Read, "", self.rt.image_fs_info()).await
    }
}
