#!/usr/bin/env node
// scripts/wasi-run.mjs — run a WASI (preview1) command module under Node.js.
//
// It is cargo's runner for the wasm32-wasip1 target, so the crate's unit tests
// run compiled to Wasm inside V8, the engine Envoy runs the filter in:
//
//   CARGO_TARGET_WASM32_WASIP1_RUNNER="node scripts/wasi-run.mjs" \
//     cargo test --lib --target wasm32-wasip1
//
// cargo calls `node scripts/wasi-run.mjs <module.wasm> <args…>`. The module sees
// argv[0] = its own path and the remaining arguments unchanged (libtest filters,
// --nocapture, …), the parent's environment (RUST_BACKTRACE, RUST_TEST_*), and the
// current directory preopened as "." (unit tests should not touch files; this
// only turns an accidental file access into a clear error). Its exit code becomes
// this process's exit code.
//
// The crate links the proxy-wasm SDK, so its test binary imports Envoy's host
// functions (`env.proxy_*`) and exports `_initialize` (from proxy_wasm::main!)
// beside `_start`. The imports are satisfied by stubs that throw if called (unit
// tests must not reach the host), and only `_start` is handed to node:wasi,
// which refuses modules that also export `_initialize`.
//
// Panics: std on wasm32-wasip1 cannot unwind, so the first failing test aborts
// the whole test binary (a Wasm `unreachable` trap) before libtest can print the
// panic message or run the remaining tests. For test binaries (modules under
// `…/deps/`) this runner therefore recovers: it captures libtest's output, finds
// the test that was running when the trap hit, reruns that test alone with
// --nocapture so its panic message is shown, then runs the tests that had not
// run yet, and so on until all have run. It ends with a line
// `wasi-run: N passed, M failed` and exits 101 if anything failed. A crash of
// Node itself (the child running the module dies of a signal) is not a test result
// and is not retried: it fails the run.
//
// Node crashes, their cause and the fix. Node 20 registers node:wasi's functions
// as V8 "fast API" functions, and its V8 (11.3) calls them from Wasm directly. No
// garbage collection may start inside such a call, as it does not update the Wasm
// frames below it (V8 does not support GC in fast calls; nodejs/node issue 46777).
// One does: uvwasi's fd_write allocates through Node's allocator, which reports the
// bytes to V8 (AdjustAmountOfExternalAllocatedMemory), and V8 may answer with a
// full, compacting GC on the spot. That GC moves the Wasm instance object but not
// the Wasm frames' saved pointers to it; back in Wasm, the code reloads the instance
// through a stale pointer. Seen with gdb in crashing runs: the last GC's stack is
// `WASI::FdWrite … FastCallback → uvwasi_fd_write → MallocImpl →
// AdjustAmountOfExternalAllocatedMemory → MarkCompact`, and the SIGSEGV follows in
// Liftoff code reading the instance from its frame right after that call returns.
// Other runs die later of what the stale pointer did: V8_Fatal `unreachable code` in
// `MarkCompactCollector::ProcessEphemerons` (under `WasmMemoryObject::Grow`: the
// crash of issue 19), `GetAlignedPointerFromInternalField() Internal field out of
// bounds` in FdWrite's FastCallback, or a SIGSEGV after every test has passed (most
// likely the "corrupted JavaScript heap" for which this runner first used a child
// process). V8 gets ready to collect because this crate's tests grow the module's
// memory (13 to 58 MiB): V8 counts the growth as external memory and starts
// incremental marking, which the next report of external memory finalizes, often
// uvwasi's inside fd_write.
//
// The fix: test binaries run with --no-turbo-fast-api-calls (CHILD_FLAGS below), so
// node:wasi's functions are called the ordinary way, through an exit frame. The same
// GC inside fd_write still happens and is then harmless (gdb: its stack now passes
// through FdWrite's SlowCallback and HandleApiCall). The full test binary, one run
// per child, on 2 shared cores: without the flag 15 of 36 runs crashed (7 of 15 with
// --compact-on-every-full-gc, which makes every full GC compact); with it 0 of 45 (0 of
// 15 with --compact-on-every-full-gc). The crashing test alone, with that flag: 2 of 50
// runs crashed without the fix, 0 of 50 with it. The price is slower node:wasi
// calls; the full binary's run time did not change measurably (39 s with the flag,
// 47 s without: means of the runs that passed).
//
// node:wasi is "experimental" in Node 20 and prints an ExperimentalWarning on
// stderr; that one warning is filtered out, all others are kept.

import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

// Drop the WASI ExperimentalWarning; it must be patched before node:wasi loads
// (hence the dynamic import below).
const emitWarning = process.emitWarning;
process.emitWarning = (warning, ...rest) => {
  const text = typeof warning === 'string' ? warning : warning?.message ?? '';
  const type = typeof rest[0] === 'string' ? rest[0] : rest[0]?.type;
  if ((type === 'ExperimentalWarning' || warning?.name === 'ExperimentalWarning') && /WASI/i.test(text)) {
    return;
  }
  return emitWarning.call(process, warning, ...rest);
};
const { WASI } = await import('node:wasi');

const [modulePath, ...userArgs] = process.argv.slice(2);
if (!modulePath) {
  process.stderr.write('usage: node scripts/wasi-run.mjs <module.wasm> [args...]\n');
  process.exit(2);
}
// Each run of the module happens in a child Node process (this script again, with
// WASI_RUN_CHILD set, same node binary and flags, plus CHILD_FLAGS below) that exits as soon
// as the module has returned; this process only reads what the child wrote. A child that dies
// of a signal is a crash of Node itself, told apart from a trap (a panic) by its exit status,
// and fails the run.
//
// Node's own flags for the child: --no-turbo-fast-api-calls for test binaries (modules
// under `…/deps/`), the fix for the crashes described at the top. Other modules (the
// benches in examples/) keep Node's defaults so as not to slow the clock reads they
// time; they are exposed to the same crash if they grow their memory.
const isTestBinary = /[\\/]deps[\\/][^\\/]+\.wasm$/.test(modulePath);
const CHILD_FLAGS = isTestBinary ? ['--no-turbo-fast-api-calls'] : [];
const CHILD = process.env.WASI_RUN_CHILD;
const TRAP_EXIT = 222; // child -> parent: the module trapped (a panic)

if (CHILD) {
  process.exit(await runHere(userArgs, CHILD === 'capture'));
}

// Runs the module in this process; returns its exit code, or TRAP_EXIT after a trap.
async function runHere(args, quietTrap) {
  const module = await WebAssembly.compile(await readFile(modulePath));
  // Imports other than WASI's: the crate links the proxy-wasm SDK, whose host
  // functions (`env.proxy_*`) Envoy provides. Unit tests must not call them (only
  // src/lib.rs glue does, and tests never build SDK contexts), so each is a stub
  // that throws a clear error if called.
  const hostStubs = {};
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.module === 'wasi_snapshot_preview1' || imp.kind !== 'function') continue;
    hostStubs[imp.module] ??= {};
    hostStubs[imp.module][imp.name] = () => {
      throw new Error(`host function ${imp.module}.${imp.name} called: not available outside Envoy`);
    };
  }
  const env = { ...process.env };
  delete env.WASI_RUN_CHILD;
  const wasi = new WASI({
    version: 'preview1',
    args: [modulePath, ...args],
    env,
    preopens: { '.': process.cwd() },
    // proc_exit(n) makes start() return n instead of ending Node.
    returnOnExit: true,
  });
  let instance;
  try {
    // getImportObject() is Node 20's; Node 18 (Debian 12's nodejs) has only wasiImport.
    const wasiImports = wasi.getImportObject?.() ?? { wasi_snapshot_preview1: wasi.wasiImport };
    instance = await WebAssembly.instantiate(module, { ...hostStubs, ...wasiImports });
  } catch (err) {
    process.stderr.write(`wasi-run: cannot instantiate ${modulePath}: ${err?.message ?? err}\n`);
    return 1;
  }
  try {
    // Only _start and memory: node:wasi refuses an instance that also exports
    // _initialize, which proxy_wasm::main! defines for the cdylib build.
    return wasi.start({ exports: { _start: instance.exports._start, memory: instance.exports.memory } }) ?? 0;
  } catch (err) {
    if (!quietTrap) process.stderr.write(`wasi-run: trap: ${err?.message ?? err}\n`);
    return TRAP_EXIT;
  }
}

const scratch = mkdtempSync(join(tmpdir(), 'wasi-run-'));

// Runs the module once with `args`, in a child process. With `capture`, its stdout goes to
// a file that is echoed afterwards (unless capture is 'quiet') and returned as `out`.
// `trapped` is true when the module ended in a trap (a panic) instead of proc_exit /
// returning from main.
function runOnce(args, { capture }) {
  const outPath = join(scratch, 'stdout');
  const outFd = capture ? openSync(outPath, 'w+') : 'inherit';
  const child = spawnSync(process.execPath, [...process.execArgv, ...CHILD_FLAGS, fileURLToPath(import.meta.url), modulePath, ...args], {
    stdio: ['inherit', outFd, 'inherit'],
    env: { ...process.env, WASI_RUN_CHILD: capture ? 'capture' : 'plain' },
  });
  const trapped = child.status === TRAP_EXIT;
  const code = trapped ? 101 : child.status ?? 101; // 101: what a panicking Rust test binary exits with
  // Node itself died (a V8 crash), as opposed to the module trapping.
  const crashed = Boolean(child.error || child.signal);
  if (crashed) {
    process.stderr.write(`wasi-run: node running ${modulePath} ended by ${child.signal ?? child.error}\n`);
  }
  let out = '';
  if (capture) {
    closeSync(outFd);
    out = readFileSync(outPath, 'utf8');
    if (capture !== 'quiet') {
      process.stdout.write(out);
      if ((trapped || crashed) && !out.endsWith('\n')) process.stdout.write('\n');
    }
  }
  return { code, trapped, crashed, out };
}

// libtest options that take a value (everything else starting with '-' is a flag).
const VALUE_OPTIONS = new Set(['--skip', '--test-threads', '--logfile', '--format', '--color', '-Z', '--shuffle-seed']);

// Splits libtest arguments into options (kept for every rerun) and positional
// filters / --skip / --exact (replaced by exact test names on reruns).
function optionsOnly(args) {
  const options = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--skip') { i++; continue; }
    if (a.startsWith('--skip=') || a === '--exact' || !a.startsWith('-')) continue;
    options.push(a);
    if (VALUE_OPTIONS.has(a) && i + 1 < args.length) options.push(args[++i]);
  }
  return options;
}

// Removes `-q` / `--quiet` / `--format terse` from libtest arguments.
function dropTerse(args) {
  const out = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '-q' || a === '--quiet' || a === '--format=terse') continue;
    if (a === '--format' && args[i + 1] === 'terse') { i++; continue; }
    out.push(a);
  }
  return out;
}

// Test names that finished (ok / FAILED / ignored) in a libtest output.
function finished(out) {
  const names = new Set();
  for (const m of out.matchAll(/^test (\S+) \.\.\. (ok|FAILED|ignored)/gm)) names.add(m[1]);
  return names;
}

const passedIn = (out) => [...out.matchAll(/^test (\S+) \.\.\. ok/gm)].length;

async function main() {
  const special = userArgs.some((a) => ['--list', '--help', '-h', '--nocapture', '--no-capture'].includes(a));
  if (!isTestBinary || special) {
    // Plain run: output straight through, no recovery.
    return (await runOnce(userArgs, { capture: false })).code;
  }

  // Recovery needs libtest's per-test lines ("test NAME ... "), so the terse
  // format (`cargo test -q`) is replaced by the default pretty one.
  const baseArgs = dropTerse(userArgs);
  const options = optionsOnly(baseArgs);
  const aborted = [];
  const done = new Set();
  let passed = 0;
  let crashed = false;
  let args = baseArgs;
  for (;;) {
    const run = await runOnce(args, { capture: true });
    passed += passedIn(run.out);
    for (const name of finished(run.out)) done.add(name);
    const running = run.out.match(/^test (\S+) \.\.\. $/m);
    if (run.crashed) {
      // Not a test result and not retried: the run fails, and the tests that had not run
      // yet are not run. (The crash this runner once retried around: see the top.)
      process.stdout.write(
        `\nwasi-run: node crashed${running ? ` while ${running[1]} ran` : ''} (a Node/V8 crash,` +
          ' not a wasm trap); the run fails\n',
      );
      crashed = true;
      break;
    }
    if (!run.trapped) {
      if (aborted.length === 0) return run.code;
      break;
    }
    if (!running) {
      process.stderr.write('wasi-run: the test binary trapped, and no running test was found in its output\n');
      return 101;
    }
    const failed = running[1];
    done.add(failed);
    aborted.push(failed);
    process.stdout.write(
      `\nwasi-run: ${failed} aborted the test binary (a panic, which cannot unwind on wasm32-wasip1,` +
        ' or a trap); rerunning it alone to show why:\n',
    );
    await runOnce([...options, '--exact', '--nocapture', failed], { capture: false });

    // The tests the user's arguments select that have not run yet.
    const list = await runOnce([...baseArgs, '--list', '--format', 'terse'], {
      capture: 'quiet',
    });
    const remaining = [...list.out.matchAll(/^(\S+): test$/gm)].map((m) => m[1]).filter((n) => !done.has(n));
    if (remaining.length === 0) break;
    process.stdout.write(`\nwasi-run: continuing with the ${remaining.length} test(s) that had not run\n`);
    args = [...options, '--exact', ...remaining];
  }
  if (aborted.length > 0) {
    process.stdout.write(`\nwasi-run: tests that failed: ${aborted.join(', ')}\n`);
  }
  process.stdout.write(`wasi-run: ${passed} passed, ${aborted.length} failed${crashed ? ', node crashed' : ''}\n`);
  return aborted.length > 0 || crashed ? 101 : 0;
}

let code;
try {
  code = await main();
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
process.exitCode = code;
