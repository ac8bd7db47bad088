# Shared by the scripts in deploy/compose (sourced): the project, its state dir
# and the compose environment.
#   CAPSTAN_COMPOSE_PROJECT  compose project name [capstan]; two projects run side by side
#   CAPSTAN_COMPOSE_STATE    certificates and tokens [~/.local/state/capstan-compose/PROJECT]
#   CAPSTAN_TAG              image tag deploy/images/build made [dev]
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PROJECT="${CAPSTAN_COMPOSE_PROJECT:-capstan}"
[[ "$PROJECT" =~ ^[a-z0-9][a-z0-9_-]*$ ]] || { echo "compose: bad project name '$PROJECT' (a-z 0-9 _ -)" >&2; exit 1; }
STATE="${CAPSTAN_COMPOSE_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/capstan-compose/$PROJECT}"
export CAPSTAN_COMPOSE_STATE="$STATE" COMPOSE_PROJECT_NAME="$PROJECT"
export COMPOSE_FILE="$HERE/docker-compose.yaml" CAPSTAN_TAG="${CAPSTAN_TAG:-dev}"
# `down` needs the variables the file requires, whatever their value.
export CAPSTAN_REGISTRATION_TOKEN="${CAPSTAN_REGISTRATION_TOKEN:-$(cat "$STATE/registration.token" 2>/dev/null || echo unset)}"
log() { printf 'compose: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v docker-compose >/dev/null || die "docker-compose is missing: apt-get install docker-compose"
dc() { docker-compose "$@"; }
# $STATE/env for the host's CLI: the coordinators' published ports (new
# ones whenever a coordinator container starts again), the CA, the token.
write_env() {
  local servers=() i
  for i in 1 2 3; do
    servers+=("https://$(dc port coordinator-$i 7700)")
  done
  cat >"$STATE/env" <<ENV
export CAPSTAN_SERVER=$(IFS=,; echo "${servers[*]}")
export CAPSTAN_CA_CERT=$STATE/certs/ca.pem
export CAPSTAN_TOKEN_FILE=$STATE/admin.token
ENV
}
