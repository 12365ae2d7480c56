//! [`InputStore`] on PostgreSQL (in progress).

use std::collections::HashMap;

use crate::{FlowId, InputStore, PgStore, Result, StoreError, StoredDoc};

fn todo<T>() -> Result<T> {
    Err(StoreError::Invalid(
        "multi-input flows are not available on the PostgreSQL store yet".into(),
    ))
}

impl InputStore for PgStore {
    fn docs_kept(&self, _flow: FlowId) -> Result<bool> {
        Ok(false)
    }
    fn keep_docs(&self, _flow: FlowId, _on: bool) -> Result<()> {
        todo()
    }
    fn put_docs(
        &self,
        _flow: FlowId,
        _docs: &[(String, Option<(Vec<u8>, Vec<u8>)>)],
    ) -> Result<()> {
        todo()
    }
    fn docs(&self, _flow: FlowId, _keys: &[String]) -> Result<Vec<StoredDoc>> {
        todo()
    }
    fn docs_since(&self, _flow: FlowId, _after: i64, _limit: usize) -> Result<Vec<StoredDoc>> {
        todo()
    }
    fn set_deps(&self, _flow: FlowId, _deps: &[(String, Vec<(FlowId, String)>)]) -> Result<()> {
        todo()
    }
    fn dependents(&self, _flow: FlowId, _up: FlowId, _keys: &[String]) -> Result<Vec<String>> {
        todo()
    }
    fn member_groups(
        &self,
        _flow: FlowId,
        _up: FlowId,
        _keys: &[String],
    ) -> Result<HashMap<String, (String, Vec<u8>)>> {
        todo()
    }
    fn group_members(&self, _flow: FlowId, _group: &str) -> Result<Vec<(FlowId, String)>> {
        todo()
    }
    fn update_members(
        &self,
        _flow: FlowId,
        _up: FlowId,
        _changes: &[(String, Option<(String, Vec<u8>)>)],
        _mark: i64,
    ) -> Result<()> {
        todo()
    }
    fn input_mark(&self, _flow: FlowId, _up: FlowId) -> Result<i64> {
        todo()
    }
    fn set_input_mark(&self, _flow: FlowId, _up: FlowId, _mark: i64) -> Result<()> {
        todo()
    }
    fn forget_inputs(&self, _flow: FlowId) -> Result<()> {
        Ok(())
    }
}
