# Shared by the CI stages (sourced, not run). Every environment a stage builds installs through a lock:
#
#   .ci/lock/<env>.txt   the exact versions of the last green run, one `name==version` per line, installed with
#                        `pip install --no-deps -r` (nothing is resolved, so a release published since changes
#                        nothing); a layered environment's lock holds only what it adds to the main one.
#   .ci/overrides.txt    the deliberate exceptions to `pip check` (a framework installed without its
#                        dependencies, a pin overridden on purpose), each with its reason.
#
# RH_TRL_CI_LATEST=1 resolves each environment from today's releases instead (its requirement specs below, the
# overrides applied the same way); RH_TRL_CI_WRITE_LOCK=1 then writes what was resolved to .ci/lock/. Either
# way each environment must pass `pip check` (but for its listed overrides), and in lock mode it must equal its
# lock exactly.

ci_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ci_latest=${RH_TRL_CI_LATEST:-0}
ci_write_lock=${RH_TRL_CI_WRITE_LOCK:-0}
# the main environment's interpreter: what `.ci/run` built, else whatever `python` is
ci_main_python=${RH_TRL_CI_PYTHON:-$(command -v python)}
ci_pip_flags=(--quiet --disable-pip-version-check)

# ci_fresh_venv DIR: a new, empty venv at DIR (an old one is removed first).
ci_fresh_venv() {
    rm -rf "$1"
    "$ci_main_python" -m venv "$1"
}

# ci_layered_venv DIR: a new venv at DIR that also sees the main environment's packages (its site directory is
# added after the venv's own, .pth files included), so a stage can add a framework without changing the main
# environment that the other stages test.
ci_layered_venv() {
    ci_fresh_venv "$1"
    local main_site venv_site
    main_site=$("$ci_main_python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    venv_site=$("$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$ci_main_python" -c "import sys; print(f'import site; site.addsitedir({sys.argv[1]!r})')" "$main_site" \
        >"$venv_site/_rh_trl_main_environment.pth"
}

# ci_install_lock PYTHON ENV: install .ci/lock/ENV.txt into PYTHON's environment, exactly, without resolving.
ci_install_lock() {
    local lock="$ci_root/.ci/lock/$2.txt"
    [ -f "$lock" ] || { echo "no lock for the $2 environment: $lock (write it with bash .ci/lock.sh)" >&2; return 1; }
    "$1" -m pip install "${ci_pip_flags[@]}" --no-deps -r "$lock"
}

# ci_check_env PYTHON ENV [--layered]: `pip check` but for ENV's overrides; in lock mode the environment must
# equal its lock; with RH_TRL_CI_WRITE_LOCK=1 the lock is written from the environment instead.
ci_check_env() {
    local args=(--python "$1" --env "$2")
    [ "${3:-}" = --layered ] && args+=(--layered)
    if [ "$ci_write_lock" = 1 ]; then
        args+=(--write-lock)
    elif [ "$ci_latest" != 1 ]; then
        args+=(--compare-lock)
    fi
    "$ci_main_python" "$ci_root/.ci/env.py" "${args[@]}"
}
