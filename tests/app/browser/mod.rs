//! In a real browser (Chromium through playwright-core, tests/browser):
//! skipped when it is missing unless `CI` is set.

mod browser_sources;
mod insights_widget;
mod operator_dashboard;
mod operator_page;
