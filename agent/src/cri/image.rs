//! The CRI ImageService.
//
// IMAGES-HELPER: this file is yours. `ImageServer::new(rt)` is built in `server.rs`; add
// the image store to `Runtime` (runtime.rs: a field, opened in `server::run` from
// `config.root`) or to `ImageServer` itself, with the smallest edits to those files.

use std::sync::Arc;

use isola_proto::cri;
use isola_proto::cri::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use super::{traced, CriError, Kind};
use crate::runtime::Runtime;

const NO_IMAGES: &str =
    "the image store (pull from registries, content store, unpack) is not built yet";

/// The CRI ImageService.
#[derive(Clone)]
pub struct ImageServer {
    #[allow(dead_code)]
    rt: Arc<Runtime>,
}

impl ImageServer {
    /// A server over `rt`.
    pub fn new(rt: Arc<Runtime>) -> ImageServer {
        ImageServer { rt }
    }
}

fn unimplemented<T>(call: &str) -> Result<T, CriError> {
    Err(CriError::Unimplemented(format!("{call}: {NO_IMAGES}")))
}

#[tonic::async_trait]
impl ImageService for ImageServer {
    async fn list_images(
        &self,
        _request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        traced("ListImages", Kind::Read, "", async {
            unimplemented("ListImages")
        })
        .await
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let r = request.into_inner();
        let id = r.image.map(|i| i.image).unwrap_or_default();
        traced("ImageStatus", Kind::Read, &id, async {
            unimplemented("ImageStatus")
        })
        .await
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = request.into_inner();
        let id = r.image.map(|i| i.image).unwrap_or_default();
        traced("PullImage", Kind::Mutating, &id, async {
            unimplemented("PullImage")
        })
        .await
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let r = request.into_inner();
        let id = r.image.map(|i| i.image).unwrap_or_default();
        traced("RemoveImage", Kind::Mutating, &id, async {
            unimplemented("RemoveImage")
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        traced("ImageFsInfo", Kind::Read, "", async {
            unimplemented("ImageFsInfo")
        })
        .await
    }
}
