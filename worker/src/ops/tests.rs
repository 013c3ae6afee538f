//! Operations without a broker or apptainer: an in-memory runtime records what it is asked,
//! so convergence after a crash and the confinement of deletes are checked directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use schemas::{ContainerName, ErrorCode, Request, StartRequest};

use super::{execute, Attempt, OpContext};
use crate::runtime::{Bind, InstanceInfo, Runtime, RuntimeError, Stopped};
use crate::store::{Change, LeftoverRow, ReplyTarget, Store};

/// Instances by name, and every call made.
#[derive(Default)]
pub(crate) struct MemoryRuntime {
    instances: Mutex<BTreeMap<String, InstanceInfo>>,
    calls: Mutex<Vec<String>>,
    fail_start: bool,
}

impl MemoryRuntime {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn run(&self, name: &str, image: &Path) {
        self.instances.lock().unwrap().insert(
            name.to_owned(),
            InstanceInfo {
                name: name.to_owned(),
                pid: 1,
                image: image.display().to_string(),
                ip: "10.22.0.9".into(),
            },
        );
    }
}

#[async_trait::async_trait]
impl Runtime for MemoryRuntime {
    async fn build_sandbox(&self, image: &Path, definition: &Path) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push("build".into());
        let text = std::fs::read_to_string(definition).unwrap();
        std::fs::create_dir_all(image.join(".singularity.d")).unwrap();
        std::fs::write(image.join(".singularity.d/Singularity"), text).unwrap();
        Ok(())
    }

    async fn start_instance(
        &self,
        image: &Path,
        name: &str,
        _: &[Bind],
    ) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push("instance start".into());
        if self.fail_start {
            return Err(RuntimeError::Failed {
                command: "instance start",
                exit: "255".into(),
                message: "container creation failed".into(),
            });
        }
        self.run(name, image);
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, RuntimeError> {
        Ok(self.instances.lock().unwrap().values().cloned().collect())
    }

    async fn instance(&self, name: &str) -> Result<Option<InstanceInfo>, RuntimeError> {
        Ok(self.instances.lock().unwrap().get(name).cloned())
    }

    async fn stop_instance(&self, name: &str) -> Result<Stopped, RuntimeError> {
        self.calls.lock().unwrap().push("instance stop".into());
        Ok(match self.instances.lock().unwrap().remove(name) {
            Some(_) => Stopped::Stopped,
            None => Stopped::WasNotRunning,
        })
    }

    async fn is_dir_in_image(&self, image: &Path, path: &str) -> Result<bool, RuntimeError> {
        Ok(image.join(path.trim_start_matches('/')).is_dir())
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok("apptainer version test".into())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    runtime: Arc<MemoryRuntime>,
    ctx: OpContext,
}

fn fixture(runtime: MemoryRuntime) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(data.join("volumes")).unwrap();
    std::fs::create_dir_all(data.join("images")).unwrap();
    let runtime = Arc::new(runtime);
    let ctx = context(&data, Arc::clone(&runtime) as Arc<dyn Runtime>);
    Fixture { dir, runtime, ctx }
}

/// The operations' context over a data directory `data` (with `volumes` and `images` made) and
/// `runtime`, without a broker.
pub(crate) fn context(data: &Path, runtime: Arc<dyn Runtime>) -> OpContext {
    OpContext {
        store: Store::open(&data.join("state.sqlite")).unwrap(),
        runtime,
        images_dir: data.join("images"),
        definitions_dir: data.join("definitions"),
        bind_roots: vec![data.join("volumes")],
        home_mount: "/home/nextpyter".into(),
        progress: Arc::new(crate::progress::Progress::new(None)),
    }
}

pub(crate) fn start(name: &str) -> Request {
    Request::Start(StartRequest {
        v: None,
        container_name: ContainerName::parse(name).unwrap(),
        container_image: "jupyter/base-notebook".into(),
        image_distributor: "docker".into(),
        image_os: "jupyter/base-notebook".into(),
        image_version: "latest".into(),
        container_command: vec!["jupyter lab".into()],
        volume_name: None,
        environment: BTreeMap::new(),
        binds: BTreeMap::new(),
    })
}

/// An inbox entry for `request`, as the intake would have written it.
pub(crate) async fn accepted(ctx: &OpContext, request: &Request) -> i64 {
    let accepted = ctx
        .store
        .accept(
            uuid::Uuid::new_v4().to_string(),
            "lane".into(),
            serde_json::to_string(request).unwrap(),
            None,
            ReplyTarget {
                reply_to: "r".into(),
                correlation_id: None,
            },
        )
        .await
        .unwrap();
    match accepted {
        crate::store::Accepted::New { seq } => seq,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_resumed_start_adopts_the_instance_its_first_run_started() {
    let f = fixture(MemoryRuntime::default());
    let request = start("nb1");
    let seq = accepted(&f.ctx, &request).await;
    // The first run started the instance, then the worker died before recording it.
    f.runtime.run("nb1", &f.ctx.image_path("nb1"));

    let outcome = execute(&f.ctx, &request, Some(Attempt { seq, number: 2 }))
        .await
        .unwrap();

    assert_eq!(outcome.status, 201);
    assert!(
        f.runtime.calls().is_empty(),
        "nothing built or started again: {:?}",
        f.runtime.calls()
    );
    let Change::Put(row) = outcome.change else {
        panic!("the adopted container is recorded")
    };
    assert!(row.active);
    assert_eq!(row.ip, "10.22.0.9");
}

#[tokio::test]
async fn a_first_start_does_not_take_over_an_instance_it_did_not_start() {
    let f = fixture(MemoryRuntime::default());
    let request = start("nb1");
    let seq = accepted(&f.ctx, &request).await;
    f.runtime.run("nb1", Path::new("/somewhere/else"));

    let error = execute(&f.ctx, &request, Some(Attempt { seq, number: 1 }))
        .await
        .unwrap_err();

    assert_eq!(error.code, ErrorCode::Conflict);
    assert!(f.runtime.calls().is_empty());
}

#[tokio::test]
async fn a_resumed_start_whose_image_was_built_does_not_build_it_again() {
    let f = fixture(MemoryRuntime::default());
    let request = start("nb1");
    let seq = accepted(&f.ctx, &request).await;
    // First run: built, then the worker died before the instance started. Apptainer keeps the
    // definition file in the image.
    let Request::Start(fields) = &request else {
        unreachable!()
    };
    let definition = crate::runtime::definition::Definition {
        bootstrap: &fields.image_distributor,
        from_os: &fields.image_os,
        from_version: &fields.image_version,
        environment: &fields.environment,
        startscript: &fields.container_command,
    }
    .render();
    let metadata = f.ctx.image_path("nb1").join(".singularity.d");
    std::fs::create_dir_all(&metadata).unwrap();
    std::fs::write(metadata.join("Singularity"), definition).unwrap();

    let outcome = execute(&f.ctx, &request, Some(Attempt { seq, number: 2 }))
        .await
        .unwrap();

    assert_eq!(outcome.status, 201);
    assert_eq!(f.runtime.calls(), ["instance start"]);
}

#[tokio::test]
async fn a_failed_instance_start_removes_the_image_it_built() {
    let f = fixture(MemoryRuntime {
        fail_start: true,
        ..MemoryRuntime::default()
    });
    let request = start("nb1");
    let seq = accepted(&f.ctx, &request).await;

    let error = execute(&f.ctx, &request, Some(Attempt { seq, number: 1 }))
        .await
        .unwrap_err();

    assert_eq!(error.code, ErrorCode::RuntimeFailed);
    assert_eq!(f.runtime.calls(), ["build", "instance start"]);
    assert!(!f.ctx.image_path("nb1").exists());
}

#[tokio::test]
async fn deletecontdata_never_deletes_outside_the_image_directory() {
    let f = fixture(MemoryRuntime::default());
    let outside = f.dir.path().join("precious");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("work.ipynb"), "{}").unwrap();
    // A recorded path that leads out of the image directory through a planted symlink.
    let link = f.ctx.images_dir.join("evil");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for (name, path) in [
        ("nb1", outside.clone()),
        ("nb2", link.join("..").join("precious")),
    ] {
        f.ctx
            .store
            .put_container(crate::store::ContainerRow {
                name: "tmp".into(),
                image: "i".into(),
                distributor: "docker".into(),
                os: "o".into(),
                version: "v".into(),
                command: vec![],
                environment: BTreeMap::new(),
                volume_name: None,
                binds: BTreeMap::new(),
                image_path: path.display().to_string(),
                active: false,
                ip: String::new(),
            })
            .await
            .unwrap();
        let deletecont = Request::Deletecont(schemas::ContainerRequest {
            v: None,
            container_name: ContainerName::parse("tmp").unwrap(),
        });
        let outcome = execute(&f.ctx, &deletecont, None).await.unwrap();
        let Change::Unregister(left) = outcome.change else {
            panic!("deletecont unregisters")
        };
        let left = LeftoverRow {
            name: name.into(),
            ..left
        };
        commit(&f.ctx.store, Change::Unregister(left)).await;
        commit(&f.ctx.store, Change::ForgetLeftover("tmp".into())).await;

        let request = Request::Deletecontdata(schemas::ContainerRequest {
            v: None,
            container_name: ContainerName::parse(name).unwrap(),
        });
        let seq = accepted(&f.ctx, &request).await;
        let error = execute(&f.ctx, &request, Some(Attempt { seq, number: 1 }))
            .await
            .unwrap_err();

        assert_eq!(error.code, ErrorCode::Unprocessable, "{name}: {error:?}");
        assert!(
            outside.join("work.ipynb").exists(),
            "{name}: the file outside is untouched"
        );
    }
}

/// Commits a change the way the executor does, outside a request.
async fn commit(store: &Store, change: Change) {
    let seq = match store
        .accept(
            uuid::Uuid::new_v4().to_string(),
            "lane".into(),
            "{}".into(),
            None,
            ReplyTarget {
                reply_to: "r".into(),
                correlation_id: None,
            },
        )
        .await
        .unwrap()
    {
        crate::store::Accepted::New { seq } => seq,
        other => panic!("{other:?}"),
    };
    store.finish(seq, change, |_| "{}".into()).await.unwrap();
}

#[tokio::test]
async fn stopping_a_container_whose_instance_is_already_gone_records_it_stopped() {
    let f = fixture(MemoryRuntime::default());
    let request = start("nb1");
    let seq = accepted(&f.ctx, &request).await;
    let started = execute(&f.ctx, &request, Some(Attempt { seq, number: 1 }))
        .await
        .unwrap();
    commit(&f.ctx.store, started.change).await;
    f.runtime.instances.lock().unwrap().clear();

    let stop = Request::Stop(schemas::ContainerRequest {
        v: None,
        container_name: ContainerName::parse("nb1").unwrap(),
    });
    let seq = accepted(&f.ctx, &stop).await;
    let outcome = execute(&f.ctx, &stop, Some(Attempt { seq, number: 2 }))
        .await
        .unwrap();

    assert_eq!(outcome.status, 200);
    let Change::Put(row) = outcome.change else {
        panic!("recorded")
    };
    assert!(!row.active);
}

#[tokio::test]
async fn a_page_of_getallcont_holds_at_most_page_size_records_however_many_leftovers() {
    // Arrange: 3 registered containers and 20 deleted ones whose data is still on disk.
    let f = fixture(MemoryRuntime::default());
    for i in 0..3 {
        let request = start(&format!("c{i}"));
        let seq = accepted(&f.ctx, &request).await;
        let started = execute(&f.ctx, &request, Some(Attempt { seq, number: 1 }))
            .await
            .unwrap();
        commit(&f.ctx.store, started.change).await;
    }
    for i in 0..20 {
        let left = LeftoverRow {
            name: format!("old{i:02}"),
            image: "jupyter/base-notebook".into(),
            image_path: format!("/images/old{i:02}"),
        };
        commit(&f.ctx.store, Change::Unregister(left)).await;
    }

    // Act: every page of 5.
    let mut seen = Vec::new();
    for page in 1..=6 {
        let request = Request::Getallcont(schemas::PageRequest {
            v: None,
            page: Some(page),
            page_size: Some(5),
        });
        let outcome = execute(&f.ctx, &request, None).await.unwrap();
        let Some(schemas::ReplyResult::Page(page)) = outcome.result else {
            panic!("getallcont returns a page")
        };

        // Assert: no page holds more than page_size records, containers and data together.
        let records = page.containers.len() + page.data.len();
        assert!(records <= 5, "page {} holds {records} records", page.page);
        assert_eq!((page.total, page.data_total), (3, 20));
        seen.extend(page.containers.iter().map(|c| c.container_name.clone()));
        seen.extend(page.data.iter().map(|d| d.container_name.clone()));
    }
    // Every record is on exactly one page: containers by name, then data by name.
    let expected: Vec<String> = (0..3)
        .map(|i| format!("c{i}"))
        .chain((0..20).map(|i| format!("old{i:02}")))
        .collect();
    assert_eq!(seen, expected);
}
