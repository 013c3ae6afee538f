//! The invocation log named by `FAKE_APPTAINER_LOG`: one JSON line when an
//! invocation begins (`"event":"begin"`, so tests can see calls that were killed)
//! and one when it ends (`end_ms`, `exit`), each appended with a single write.

use std::path::PathBuf;

use crate::json::J;
use crate::sys;

pub struct Invocation {
    path: Option<PathBuf>,
    argv: Vec<String>,
    start_ms: u128,
}

impl Invocation {
    pub fn begin(argv: &[String]) -> Invocation {
        let invocation = Invocation {
            path: sys::env_nonempty("FAKE_APPTAINER_LOG").map(PathBuf::from),
            argv: argv.to_vec(),
            start_ms: sys::now_ms(),
        };
        invocation.write(vec![("event", J::s("begin"))]);
        invocation
    }

    /// `signal` is set when the command we ran was killed by one (exit is then 128+n).
    pub fn end(&self, exit: i32, signal: Option<i32>) {
        let mut extra = vec![
            ("end_ms", J::Int(sys::now_ms() as i64)),
            ("exit", J::Int(i64::from(exit))),
        ];
        if let Some(sig) = signal {
            extra.push(("signal", J::Int(i64::from(sig))));
        }
        self.write(extra);
    }

    fn write(&self, extra: Vec<(&str, J)>) {
        let Some(path) = &self.path else {
            return;
        };
        let mut fields = vec![
            ("pid", J::Int(i64::from(std::process::id()))),
            ("argv", J::strs(&self.argv)),
            ("start_ms", J::Int(self.start_ms as i64)),
        ];
        fields.extend(extra);
        let _ = sys::append_line(path, &J::o(fields).compact());
    }
}
