# Sourced by the fetch scripts: apt with a private sources list, state and cache under a build
# folder, so the system's apt configuration and packages are untouched.
# private_apt_setup DIR deb|deb-src: writes DIR/sources.list (Debian trixie main), sets the array
# apt_opts for `apt-get "${apt_opts[@]}" ...` and updates the private package index.
private_apt_setup() {
    local dir=$1 kind=$2
    mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial"
    echo "$kind [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$dir/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache"
              -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -qq)
    apt-get "${apt_opts[@]}" update
}
