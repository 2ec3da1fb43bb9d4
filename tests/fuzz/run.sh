#!/bin/sh
# Runs every libFuzzer target for a bounded time, starting from its committed seed corpus, and
# fails if any of them finds a crash (a sanitizer report, a trapped invariant, an uncaught
# exception, a timeout or running out of memory). Builds nothing.
#
#   cmake --preset fuzz && cmake --build --preset fuzz && tests/fuzz/run.sh build/fuzz
#
# Usage: run.sh BUILD_DIR [SECONDS_PER_TARGET]   (default 9 s: about 60 s for the six targets)
#
# The seed corpus (tests/fuzz/corpus/<target>/) is only read: new inputs go to a temporary
# directory, and a crashing input is written to $MOE_FUZZ_ARTIFACTS (default: a temporary
# directory, printed) as crash-<sha1>, which reproduces with
#   BUILD_DIR/tests/fuzz/fuzz_<target> ARTIFACT
# and joins the target's corpus (named by its sha1) once fixed.
#
# Every run draws new inputs, so a short run (CI's) can meet a failure a previous one did not; a
# fixed -seed does not pin them down (identical seeded runs reach different coverage here and
# diverge), so before relying on a change, fuzz its targets for minutes: run.sh BUILD_DIR 200.
#
# Regenerating a target's seed corpus (after changing how it decodes its input): fuzz from an
# empty directory for a few minutes, then keep the fewest inputs that cover every edge reached:
#   mkdir -p /tmp/new && BUILD_DIR/tests/fuzz/fuzz_<target> -max_total_time=300 -max_len=512 /tmp/new
#   rm -rf tests/fuzz/corpus/<target>
#   tests/fuzz/minimize_corpus.py BUILD_DIR/tests/fuzz/fuzz_<target> /tmp/new tests/fuzz/corpus/<target>
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 BUILD_DIR [SECONDS_PER_TARGET]" >&2
  exit 2
fi
build=$1
seconds=${2:-9}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/moe-fuzz.XXXXXX")
artifacts=${MOE_FUZZ_ARTIFACTS:-$work/artifacts}
mkdir -p "$artifacts"

# Sanitizer reports abort; leaks count as failures too.
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

failed=""
count=0
for corpus in "$here"/corpus/*/; do
  target=$(basename "$corpus")
  binary="$build/tests/fuzz/fuzz_$target"
  count=$((count + 1))
  if [ ! -x "$binary" ]; then
    echo "run.sh: $binary is missing (build the fuzz preset first)" >&2
    failed="$failed $target"
    continue
  fi
  mkdir -p "$work/$target"
  echo "=== $target: ${seconds}s from $(ls "$corpus" | wc -l) seed inputs"
  "$binary" "$work/$target" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -max_len=4096 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$target-" >"$work/$target.log" 2>&1
  status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$work/$target.log" | sed "s/^/  /"
  if [ $status -ne 0 ]; then
    echo "=== $target FAILED (exit $status); the end of its log:"
    tail -n 60 "$work/$target.log"
    failed="$failed $target"
  fi
done

if [ $count -eq 0 ]; then
  echo "run.sh: no corpus directories under $here/corpus" >&2
  exit 2
fi
if [ -n "$failed" ]; then
  echo "fuzzing FAILED:$failed (inputs in $artifacts, logs in $work)"
  exit 1
fi
rm -rf "$work"
echo "fuzzing passed: $count targets, ${seconds}s each"
