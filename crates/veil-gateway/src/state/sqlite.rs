//! The embedded [`Store`]: one SQLite database, `<state>/state.db`, in WAL mode with full
//! synchronisation (a commit is on disk before it returns), an exclusive lock (one veil per
//! state directory), a schema version (`PRAGMA user_version`) and forward migrations.

use super::{Invocation, InvocationState, Store, StoreError, StoredFunction, TrafficTarget};
use crate::functions::FunctionRecord;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The database's file name in the state directory.
pub const FILE: &str = "state.db";

/// What an earlier veil kept deployments in; imported once into a fresh database.
const LEGACY_FILE: &str = "functions.json";

/// Schema migrations, in order: migration `i` takes the database from version `i` to `i + 1`.
/// Never edit one that has shipped; add the next.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: functions, their revisions and traffic; per-name revision counters that outlive a
    // delete, so a revision number is never reused.
    "CREATE TABLE names (
         name TEXT PRIMARY KEY,
         last_revision INTEGER NOT NULL
     );
     CREATE TABLE functions (
         name TEXT PRIMARY KEY REFERENCES names(name),
         tenant TEXT NOT NULL,
         traffic TEXT NOT NULL
     );
     CREATE TABLE revisions (
         function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
         revision INTEGER NOT NULL,
         record TEXT NOT NULL,
         PRIMARY KEY (function, revision)
     );",
    // 2: asynchronous invocations.
    "CREATE TABLE invocations (
         id TEXT PRIMARY KEY,
         function TEXT NOT NULL,
         state TEXT NOT NULL,
         updated_ms INTEGER NOT NULL,
         body TEXT NOT NULL
     );
     CREATE INDEX invocations_by_state ON invocations(state, updated_ms);
     CREATE INDEX invocations_by_function ON invocations(function);",
];

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn state_name(s: InvocationState) -> &'static str {
    match s {
        InvocationState::Queued => "queued",
        InvocationState::Running => "running",
        InvocationState::Succeeded => "succeeded",
        InvocationState::Failed => "failed",
    }
}

impl SqliteStore {
    /// Open (or create) `<state_dir>/state.db`: check its integrity, take its lock, migrate
    /// it to this build's schema, and on first creation import an earlier veil's
    /// `functions.json`. Refuses a corrupt database, one of a newer schema, or one another
    /// process holds.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(FILE);
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
                corrupt(e.to_string())
            }
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => {
                StoreError::Locked { path: path.clone() }
            }
            _ => StoreError::Sqlite(e),
        };
        let mut conn = Connection::open(&path).map_err(classify)?;
        // No waiting: a second veil on the same directory is refused at once.
        conn.busy_timeout(std::time::Duration::ZERO)
            .map_err(classify)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(classify)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(classify)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(corrupt(format!("cannot use WAL journaling (got {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(classify)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(classify)?;
        let check: Vec<String> = {
            let mut st = conn.prepare("PRAGMA quick_check").map_err(classify)?;
            let rows = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(classify)?;
            rows.collect::<Result<_, _>>().map_err(classify)?
        };
        if check != ["ok"] {
            return Err(corrupt(check.join("; ")));
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(classify)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        if version < 0 {
            return Err(corrupt(format!("schema version {version}")));
        }
        let fresh = version == 0;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(classify)?;
            tx.execute_batch(sql).map_err(classify)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(classify)?;
            tx.commit().map_err(classify)?;
            tracing::info!(db = %path.display(), version = i + 1, "state database migrated");
        }
        let store = Self {
            path,
            conn: Mutex::new(conn),
        };
        if fresh {
            store.import_legacy(state_dir)?;
        }
        // Everything veil stores must read back: a row that does not is corruption too.
        store.load()?;
        Ok(store)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // Transactions are atomic, so a panic while holding the lock leaves nothing half-done.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// Import `functions.json` (each record as its revision, all traffic to the latest) and
    /// rename it `functions.json.imported`. An unreadable file is refused, not skipped.
    fn import_legacy(&self, state_dir: &Path) -> Result<(), StoreError> {
        let file = state_dir.join(LEGACY_FILE);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(StoreError::Corrupt {
                    path: file,
                    reason: format!("cannot read it to import: {e}"),
                })
            }
        };
        let records: Vec<FunctionRecord> =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: file.clone(),
                reason: format!("cannot import it: {e}"),
            })?;
        {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            for r in &records {
                let json = encode("a revision", r)?;
                let traffic = encode("traffic", &TrafficTarget::latest())?;
                tx.execute(
                    "INSERT INTO names (name, last_revision) VALUES (?1, ?2)",
                    params![r.name, r.revision as i64],
                )?;
                tx.execute(
                    "INSERT INTO functions (name, tenant, traffic) VALUES (?1, ?2, ?3)",
                    params![r.name, r.tenant, traffic],
                )?;
                tx.execute(
                    "INSERT INTO revisions (function, revision, record) VALUES (?1, ?2, ?3)",
                    params![r.name, r.revision as i64, json],
                )?;
            }
            tx.commit()?;
        }
        // Imported: a crash before the rename imports nothing twice, since the database is no
        // longer fresh.
        let done = state_dir.join(format!("{LEGACY_FILE}.imported"));
        if let Err(e) = std::fs::rename(&file, &done) {
            tracing::warn!(file = %file.display(), error = %e, "imported, but cannot rename it");
        }
        tracing::info!(functions = records.len(), from = %file.display(), "deployments imported into the state database");
        Ok(())
    }
}

fn encode<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|source| StoreError::Encode { what, source })
}

impl Store for SqliteStore {
    fn load(&self) -> Result<HashMap<String, StoredFunction>, StoreError> {
        let conn = self.conn();
        let mut out: HashMap<String, StoredFunction> = HashMap::new();
        let mut tenants: HashMap<String, String> = HashMap::new();
        let mut st = conn.prepare("SELECT name, tenant, traffic FROM functions")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (name, tenant, traffic) = row?;
            let traffic: Vec<TrafficTarget> = serde_json::from_str(&traffic)
                .map_err(|e| self.corrupt(format!("the traffic of function {name:?}: {e}")))?;
            tenants.insert(name.clone(), tenant);
            out.insert(
                name,
                StoredFunction {
                    revisions: Vec::new(),
                    traffic,
                },
            );
        }
        let mut st = conn.prepare(
            "SELECT function, revision, record FROM revisions ORDER BY function, revision",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (name, number, record) = row?;
            let rec: FunctionRecord = serde_json::from_str(&record)
                .map_err(|e| self.corrupt(format!("revision {number} of {name:?}: {e}")))?;
            if rec.name != name || rec.revision as i64 != number {
                return Err(self.corrupt(format!(
                    "revision {number} of {name:?} holds revision {} of {:?}",
                    rec.revision, rec.name
                )));
            }
            let tenant = tenants.get(&name).cloned().unwrap_or_default();
            if rec.tenant != tenant {
                return Err(self.corrupt(format!(
                    "revision {number} of {name:?} names tenant {:?}, the function {tenant:?}",
                    rec.tenant
                )));
            }
            if let Some(f) = out.get_mut(&name) {
                f.revisions.push(rec);
            }
        }
        if let Some((name, _)) = out.iter().find(|(_, f)| f.revisions.is_empty()) {
            return Err(self.corrupt(format!("function {name:?} has no revision")));
        }
        Ok(out)
    }

    fn add_revision(
        &self,
        record: &mut FunctionRecord,
        traffic: &[TrafficTarget],
        prune: &[u64],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT last_revision FROM names WHERE name = ?1",
                params![record.name],
                |r| r.get(0),
            )
            .optional()?;
        let number = last.unwrap_or(0) + 1;
        record.revision = number as u64;
        tx.execute(
            "INSERT INTO names (name, last_revision) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET last_revision = excluded.last_revision",
            params![record.name, number],
        )?;
        let traffic = encode("traffic", &traffic)?;
        tx.execute(
            "INSERT INTO functions (name, tenant, traffic) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET traffic = excluded.traffic",
            params![record.name, record.tenant, traffic],
        )?;
        tx.execute(
            "INSERT INTO revisions (function, revision, record) VALUES (?1, ?2, ?3)",
            params![record.name, number, encode("a revision", &*record)?],
        )?;
        for p in prune {
            tx.execute(
                "DELETE FROM revisions WHERE function = ?1 AND revision = ?2",
                params![record.name, *p as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_traffic(&self, name: &str, traffic: &[TrafficTarget]) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE functions SET traffic = ?2 WHERE name = ?1",
            params![name, encode("traffic", &traffic)?],
        )?;
        if n == 0 {
            return Err(self.corrupt(format!("function {name:?} vanished from the database")));
        }
        Ok(())
    }

    fn delete_function(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM invocations WHERE function = ?1", params![name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn insert_invocation(&self, inv: &Invocation) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO invocations (id, function, state, updated_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                inv.id,
                inv.function,
                state_name(inv.state),
                inv.updated_ms as i64,
                encode("an invocation", inv)?
            ],
        )?;
        Ok(())
    }

    fn update_invocation(&self, inv: &Invocation) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE invocations SET state = ?2, updated_ms = ?3, body = ?4 WHERE id = ?1",
            params![
                inv.id,
                state_name(inv.state),
                inv.updated_ms as i64,
                encode("an invocation", inv)?
            ],
        )?;
        Ok(n > 0)
    }

    fn invocation(&self, id: &str) -> Result<Option<Invocation>, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT body FROM invocations WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|e| self.corrupt(format!("invocation {id}: {e}")))
        })
        .transpose()
    }

    fn unfinished_invocations(&self) -> Result<Vec<Invocation>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, body FROM invocations WHERE state IN ('queued', 'running')
             ORDER BY updated_ms",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(
                serde_json::from_str(&body)
                    .map_err(|e| self.corrupt(format!("invocation {id}: {e}")))?,
            );
        }
        Ok(out)
    }

    fn expire_invocations(&self, before_ms: u64) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM invocations WHERE state IN ('succeeded', 'failed') AND updated_ms < ?1",
            params![before_ms as i64],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, tenant: &str) -> FunctionRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "tenant": tenant,
            "image": {"reference": "local/f:v1", "registry": "local", "repository": "f",
                "manifest_digest":
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"},
            "env": {}, "concurrency": 1, "min_scale": 0, "max_scale": 1, "port": 8080,
            "ready_timeout_s": 1, "idle_timeout_s": 1, "revision": 0
        }))
        .expect("a record")
    }

    fn err_text<T>(r: Result<T, StoreError>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn revisions_are_numbered_durably_and_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SqliteStore::open(dir.path()).expect("open");
            let mut r = record("hello", "acme");
            s.add_revision(&mut r, &TrafficTarget::latest(), &[])
                .expect("add");
            assert_eq!(r.revision, 1);
            s.add_revision(&mut r, &TrafficTarget::latest(), &[])
                .expect("add");
            assert_eq!(r.revision, 2);
            let pinned = vec![TrafficTarget {
                revision: Some(1),
                percent: 100,
                tag: Some("stable".into()),
            }];
            s.set_traffic("hello", &pinned).expect("traffic");
        }
        // Reopened: everything acknowledged is there.
        let s = SqliteStore::open(dir.path()).expect("reopen");
        let all = s.load().expect("load");
        let f = &all["hello"];
        assert_eq!(
            f.revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(f.traffic[0].revision, Some(1));
        // Deleted and created again: numbering goes on, so a stale reference to revision 1
        // can never meet a new revision 1.
        assert!(s.delete_function("hello").expect("delete"));
        assert!(!s.delete_function("hello").expect("delete again"));
        assert!(s.load().expect("load").is_empty());
        let mut r = record("hello", "acme");
        s.add_revision(&mut r, &TrafficTarget::latest(), &[])
            .expect("add");
        assert_eq!(r.revision, 3);
        // Pruned revisions go in the same transaction.
        s.add_revision(&mut r, &TrafficTarget::latest(), &[3])
            .expect("add");
        let all = s.load().expect("load");
        assert_eq!(
            all["hello"]
                .revisions
                .iter()
                .map(|r| r.revision)
                .collect::<Vec<_>>(),
            [4]
        );
    }

    #[test]
    fn a_corrupt_database_is_refused_not_read_around() {
        // Not a database at all.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), vec![0x5a; 8192]).expect("write");
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("is corrupt"), "{e}");
        assert!(e.contains("move it away"), "{e}");

        // A database whose pages were overwritten.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SqliteStore::open(dir.path()).expect("open");
            for i in 0..200 {
                let mut r = record(&format!("f{i}"), "acme");
                r.env.insert("PAD".into(), "x".repeat(500));
                s.add_revision(&mut r, &TrafficTarget::latest(), &[])
                    .expect("add");
            }
        }
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
        for b in &mut bytes[5 * 4096..9 * 4096] {
            *b = 0xff;
        }
        std::fs::write(&path, &bytes).expect("write");
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("is corrupt"), "{e}");

        // A row veil did not write.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SqliteStore::open(dir.path()).expect("open");
            let mut r = record("hello", "acme");
            s.add_revision(&mut r, &TrafficTarget::latest(), &[])
                .expect("add");
            s.conn()
                .execute("UPDATE revisions SET record = '{\"name\": 7}'", [])
                .expect("tamper");
        }
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("revision 1 of \"hello\""), "{e}");
    }

    #[test]
    fn schema_versions_migrate_forward_and_newer_ones_are_refused() {
        // A database at version 1 (before asynchronous invocations) migrates to the latest
        // and keeps its functions.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let conn = Connection::open(dir.path().join(FILE)).expect("open");
            conn.execute_batch(MIGRATIONS[0]).expect("v1");
            conn.pragma_update(None, "user_version", 1)
                .expect("version");
            let mut r1 = record("old", "acme");
            r1.revision = 1;
            conn.execute_batch(
                "INSERT INTO names VALUES ('old', 1);
                 INSERT INTO functions VALUES ('old', 'acme', '[{\"percent\":100}]');",
            )
            .expect("rows");
            conn.execute(
                "INSERT INTO revisions VALUES ('old', 1, ?1)",
                [serde_json::to_string(&r1).expect("json")],
            )
            .expect("revision");
        }
        let s = SqliteStore::open(dir.path()).expect("migrate");
        assert_eq!(s.load().expect("load")["old"].revisions.len(), 1);
        assert!(s.unfinished_invocations().expect("v2 table").is_empty());
        let v: i64 = s
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, MIGRATIONS.len() as i64);
        drop(s);

        s_set_version(dir.path(), 99);
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("schema version 99"), "{e}");
        assert!(e.contains("newer veil"), "{e}");
    }

    fn s_set_version(dir: &Path, v: i64) {
        let conn = Connection::open(dir.join(FILE)).expect("open");
        conn.pragma_update(None, "user_version", v)
            .expect("version");
    }

    #[test]
    fn a_second_veil_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = SqliteStore::open(dir.path()).expect("open");
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("in use by another veil"), "{e}");
    }

    #[test]
    fn an_earlier_veils_functions_json_is_imported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = record("legacy", "acme");
        r.revision = 4;
        std::fs::write(
            dir.path().join(LEGACY_FILE),
            serde_json::to_vec(&[&r]).expect("json"),
        )
        .expect("write");
        let s = SqliteStore::open(dir.path()).expect("open");
        let all = s.load().expect("load");
        assert_eq!(all["legacy"].revisions[0].revision, 4);
        assert_eq!(all["legacy"].traffic, TrafficTarget::latest());
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert!(dir.path().join("functions.json.imported").exists());
        let mut next = record("legacy", "acme");
        s.add_revision(&mut next, &TrafficTarget::latest(), &[])
            .expect("add");
        assert_eq!(next.revision, 5);

        // An unreadable one stops the start instead of being skipped.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LEGACY_FILE), b"[{not json").expect("write");
        let e = err_text(SqliteStore::open(dir.path()));
        assert!(e.contains("cannot import"), "{e}");
    }
}
