#!/usr/bin/env bash
# Installs the pinned npm packages, checks that build/settlement.boc is what
# settlement.tolk compiles to, and runs the sandbox tests (including the
# cross-check against cheques and messages the Rust crate wrote to fixtures/).
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm test
