//! SQLite storage of resources, reference values and policies (`<state_dir>/kbs.db`).

use crate::error::Result;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use zeroize::Zeroizing;

/// Which policy.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PolicyKind {
    Attestation,
    Resource,
}

impl PolicyKind {
    fn key(self) -> &'static str {
        match self {
            PolicyKind::Attestation => "attestation",
            PolicyKind::Resource => "resource",
        }
    }
}

pub(crate) struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS resources (path TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS reference_values (name TEXT PRIMARY KEY, vals TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS policies (kind TEXT PRIMARY KEY, rego TEXT NOT NULL);",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions are
        // atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_resource(&self, path: &str, value: &[u8]) -> Result<()> {
        self.conn().execute(
            "INSERT INTO resources (path, value) VALUES (?1, ?2)
             ON CONFLICT(path) DO UPDATE SET value = excluded.value",
            params![path, value],
        )?;
        Ok(())
    }

    pub(crate) fn get_resource(&self, path: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM resources WHERE path = ?1",
                params![path],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?
            .map(Zeroizing::new))
    }

    pub(crate) fn delete_resource(&self, path: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM resources WHERE path = ?1", params![path])?
            > 0)
    }

    pub(crate) fn list_resources(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT path FROM resources ORDER BY path")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub(crate) fn set_reference_values(&self, name: &str, values: &[String]) -> Result<()> {
        let json = serde_json::to_string(values)
            .map_err(|e| crate::KbsError::InvalidValue(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO reference_values (name, vals) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET vals = excluded.vals",
            params![name, json],
        )?;
        Ok(())
    }

    pub(crate) fn reference_values(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT name, vals FROM reference_values ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (name, vals) = row?;
            // Values were validated when stored; an unreadable row counts as no values.
            out.insert(name, serde_json::from_str(&vals).unwrap_or_default());
        }
        Ok(out)
    }

    pub(crate) fn set_policy(&self, kind: PolicyKind, rego: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO policies (kind, rego) VALUES (?1, ?2)
             ON CONFLICT(kind) DO UPDATE SET rego = excluded.rego",
            params![kind.key(), rego],
        )?;
        Ok(())
    }

    pub(crate) fn policy(&self, kind: PolicyKind) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT rego FROM policies WHERE kind = ?1",
                params![kind.key()],
                |r| r.get(0),
            )
            .optional()?)
    }
}
