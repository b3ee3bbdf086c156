//! Diagnostics: the one shape in which every load error, validation error, warning and
//! analyzer finding is reported, always naming file:line, resource and field path.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::source::Document;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// Where a resource was read from. The document is kept so a field path can be turned into
/// the line it was written on long after loading.
#[derive(Debug, Clone)]
pub struct Origin {
    pub doc: Arc<Document>,
}

impl Origin {
    pub fn file(&self) -> &str {
        &self.doc.file
    }
    pub fn line(&self) -> usize {
        self.doc.line
    }
    pub fn line_of(&self, field: &str) -> usize {
        self.doc.line_of(field)
    }
    /// An origin for resources built in code (tests, benchmarks).
    pub fn synthetic(name: &str) -> Self {
        Origin {
            doc: Arc::new(Document::synthetic(name, serde_json::Value::Null)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// `IST0106`-style for checks Istio itself has, `WRD0xxx` for Warden's own.
    pub code: &'static str,
    pub file: String,
    pub line: usize,
    /// `Kind namespace/name`, when the finding is about one resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Field path inside the resource, e.g. `spec.rules[0].from[0].source.principals[1]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {} [{}]",
            self.file,
            self.line,
            self.severity.as_str(),
            self.code
        )?;
        if let Some(r) = &self.resource {
            write!(f, " {r}")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Builds diagnostics about one resource, resolving field paths to lines.
pub struct Reporter<'a> {
    pub origin: &'a Origin,
    pub resource: String,
    pub out: &'a mut Vec<Diagnostic>,
}

impl Reporter<'_> {
    pub fn push(&mut self, severity: Severity, code: &'static str, field: &str, msg: String) {
        self.out.push(Diagnostic {
            severity,
            code,
            file: self.origin.file().to_string(),
            line: if field.is_empty() {
                self.origin.line()
            } else {
                self.origin.line_of(field)
            },
            resource: Some(self.resource.clone()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: msg,
        });
    }
    pub fn error(&mut self, field: &str, msg: impl Into<String>) {
        self.push(Severity::Error, "IST0106", field, msg.into());
    }
    pub fn warning(&mut self, field: &str, msg: impl Into<String>) {
        self.push(Severity::Warning, "IST0133", field, msg.into());
    }
}
