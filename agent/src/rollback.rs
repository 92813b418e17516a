//! Undo on failure: steps registered while a multi-step operation builds resources, run in
//! reverse order when it fails (or is cancelled), dropped when it commits.

use futures::future::BoxFuture;

/// A stack of undo steps.
#[derive(Default)]
pub struct Rollback {
    steps: Vec<(&'static str, BoxFuture<'static, ()>)>,
}

impl Rollback {
    /// An empty stack.
    pub fn new() -> Rollback {
        Rollback::default()
    }

    /// Registers an undo step.
    pub fn push(
        &mut self,
        what: &'static str,
        step: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.steps.push((what, Box::pin(step)));
    }

    /// The operation succeeded: forget every step.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// The operation failed: undo, newest first.
    pub async fn run(mut self) {
        while let Some((what, step)) = self.steps.pop() {
            tracing::debug!(step = what, "undo");
            step.await;
        }
    }
}

impl Drop for Rollback {
    /// A cancelled operation (the client went away mid-call) still undoes its steps, on
    /// the runtime, in order.
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let steps = std::mem::take(&mut self.steps);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for (what, step) in steps.into_iter().rev() {
                    tracing::debug!(step = what, "undo after cancellation");
                    step.await;
                }
            });
        }
    }
}
