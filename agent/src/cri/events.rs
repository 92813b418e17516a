//! GetContainerEvents: the live feed of container and sandbox lifecycle events.

use std::pin::Pin;

use futures::Stream;
use isola_proto::cri;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use crate::runtime::Runtime;

type EventStream =
    Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send + 'static>>;

impl Runtime {
    /// A stream of events from now on; it ends when the agent shuts down. A subscriber
    /// that falls more than the channel's capacity behind loses the oldest events (and
    /// the loss is logged) rather than holding the agent's memory.
    pub fn container_events(&self) -> EventStream {
        let mut rx = self.events.subscribe();
        let mut shutdown = self.shutdown.clone();
        Box::pin(async_stream(move |tx| async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    ev = rx.recv() => match ev {
                        Ok(ev) => {
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(lost = n, "a GetContainerEvents client fell behind");
                        }
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        }))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<cri::ContainerEventResponse, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<cri::ContainerEventResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
