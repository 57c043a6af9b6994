//! How the Redis backend lays a store out in Redis: the names of its Redis keys, the listing
//! sets, the session groups used for TTLs, and the Lua scripts that change a value together
//! with its listing entries. Owns the names and the scripts; calls only [`StorageKey`].
//!
//! ```text
//! <prefix>:v:<key>       a value, as a Redis string of bytes
//! <prefix>:d:<folder>    a folder's listing: a set whose members are the names of its values
//!                        ("c1.json") and of its subfolders, with a trailing slash ("s1/")
//! <prefix>:g:<session>   with a session TTL only: the Redis keys of one session (its record,
//!                        checkpoints and their folder sets), expired together
//! <prefix>:l:<lease>     a lease: a hash of `node`, `token`, `expires_at` (ms, by the
//!                        server's `TIME`) and `released` ("1" once its holder released it,
//!                        "0" after a grant or renewal; absent reads as "0"); never expires
//!                        and is never deleted, so its token never goes back
//! <prefix>:events        the pub/sub channel of change events (not a key)
//! ```
//!
//! A fenced write is its plain script with the lease's hash as the last key and the fence's
//! token as the last argument: the script compares the token first and, if it is not the
//! lease's, returns `-1 - current` (current 0: no lease) having changed nothing.
//!
//! A folder is every proper ancestor of a key but the top one is registered in its parent
//! (`checkpoints/s1/c.json` is member `c.json` of `checkpoints/s1`, which is member `s1/`
//! of `checkpoints`). `list(p)` walks the sets from `p` down, so it costs what it returns
//! (plus the subfolders on the way), never a scan of the keyspace.
//!
//! Invariant: a value is never stored without its listing entries, because one script
//! adds the entries and then sets the value (a script runs whole, alone, and is written to
//! the AOF as one unit). Once a script of the backend has made a key's entries, later puts
//! and appends of that key (outside session groups) are a bare `SET` or `APPEND` until the
//! backend sends a delete of it (`writer.rs` keeps that set of keys). The reverse (an entry whose value is gone: a value that expired,
//! a folder left empty) is allowed: the listing script checks each entry's value exists and
//! removes entries that point at nothing.

use crate::backend::{KeyClass, StorageKey};

/// The Redis keys one write touches, and the arguments its script needs.
pub(super) struct Names {
    /// `<prefix>:v:<key>`.
    pub(super) value: String,
    /// The folder sets holding the key's listing entries, deepest first, and the member each
    /// gets: (`<prefix>:d:<folder>`, member).
    pub(super) folders: Vec<(String, String)>,
    /// With a session TTL and a key of a session: `<prefix>:g:<session>`; else empty.
    pub(super) group: String,
    /// How many of `folders` (deepest first) belong to the session alone and expire with it.
    pub(super) owned_folders: usize,
}

/// The Redis key names of a store under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `<prefix>:`.
    base: String,
}

impl Layout {
    pub(super) fn new(prefix: &str) -> Self {
        Layout { base: format!("{prefix}:") }
    }

    /// `<prefix>:`, which the listing script prepends to the names it builds.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    pub(super) fn value(&self, key: &StorageKey) -> String {
        format!("{}v:{key}", self.base)
    }

    pub(super) fn folder(&self, folder: &str) -> String {
        format!("{}d:{folder}", self.base)
    }

    /// `<prefix>:events`: the pub/sub channel of the store's change events (a channel, not
    /// a key: nothing is stored under it).
    pub(super) fn events(&self) -> String {
        format!("{}events", self.base)
    }

    /// `<prefix>:l:<name>`: a lease's hash.
    pub(super) fn lease(&self, name: &str) -> String {
        format!("{}l:{name}", self.base)
    }

    /// Every Redis key a write of `key` touches. `ttl` says whether the store keeps session
    /// groups.
    pub(super) fn names(&self, key: &StorageKey, ttl: bool) -> Names {
        let path = key.as_str();
        let mut folders = Vec::new();
        let mut end = path.len();
        // From the key's own folder up to (not including) the top one: each folder gets the
        // name of what lies below it.
        while let Some(slash) = path[..end].rfind('/') {
            let name = &path[slash + 1..end];
            let member = if end == path.len() { name.to_owned() } else { format!("{name}/") };
            folders.push((self.folder(&path[..slash]), member));
            end = slash;
        }
        let group = if ttl { session_of(key) } else { None };
        let owned_folders = match group {
            // The key's folders below `<top>/<session>` are the session's alone.
            Some(_) => folders.len().saturating_sub(1),
            None => 0,
        };
        Names {
            value: self.value(key),
            folders,
            group: group.map(|s| format!("{}g:{s}", self.base)).unwrap_or_default(),
            owned_folders,
        }
    }
}

/// The session a record key belongs to, for session TTLs: `<top>/<session>/...` (a
/// checkpoint) or `<top>/<session><ending>` (a session record, whose ending starts with
/// `.json`: the record endings of `store::keys`). Keys of other classes belong to no
/// session and never expire.
pub(super) fn session_of(key: &StorageKey) -> Option<&str> {
    if key.class() != KeyClass::Record {
        return None;
    }
    let mut segs = key.segments().skip(1);
    let second = segs.next()?;
    if segs.next().is_some() {
        return Some(second);
    }
    Some(second.rfind(".json").map_or(second, |at| &second[..at])).filter(|s| !s.is_empty())
}

/// The shared part of the write scripts: after the value's own change, keep the session
/// group. KEYS[2] is the group ("" for none), ARGV[1] the TTL in ms ("0" for none), ARGV[2]
/// how many of the Redis keys from KEYS[3] on (the value's folders, deepest first) belong to
/// the session. Every member of the group gets the TTL again; members gone are dropped.
const REFRESH_GROUP: &str = r"
local function refresh_group(folders_from)
  local ttl = tonumber(ARGV[1])
  if KEYS[2] == '' or ttl == 0 then return end
  redis.call('SADD', KEYS[2], KEYS[1])
  for i = 1, tonumber(ARGV[2]) do
    redis.call('SADD', KEYS[2], KEYS[folders_from + i - 1])
  end
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if redis.call('PEXPIRE', member, ttl) == 0 then
      redis.call('SREM', KEYS[2], member)
    end
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
";

/// The prologue of a fenced script: KEYS[#KEYS] is the lease's hash, ARGV[#ARGV] the
/// fence's token (decimal). Returns `-1 - current` unless the lease's token is the fence's;
/// else sets `last`, the last key of the plain script.
const FENCE_CHECK: &str = r"
local current = redis.call('HGET', KEYS[#KEYS], 'token')
if current ~= ARGV[#ARGV] then
  return -1 - (tonumber(current) or 0)
end
local last = #KEYS - 1
";

/// `put`: KEYS = value, group, folders (deepest first); ARGV = ttl, owned, value, members.
/// The listing entries first, the value last: if a command fails midway (a foreign key of
/// another type under the prefix), no value is left without its entries. `fenced`: with
/// [`FENCE_CHECK`] first (KEYS and ARGV then end in the lease and the token).
pub(super) fn put_script(fenced: bool) -> String {
    let (check, last) = if fenced { (FENCE_CHECK, "last") } else { ("", "#KEYS") };
    format!(
        "#!lua\n{REFRESH_GROUP}{check}
for i = 3, {last} do
  redis.call('SADD', KEYS[i], ARGV[i + 1])
end
redis.call('SET', KEYS[1], ARGV[3])
refresh_group(3)
return 1
"
    )
}

/// `append`: as `put`, but APPENDs; returns the new length.
pub(super) fn append_script() -> String {
    format!(
        "#!lua\n{REFRESH_GROUP}
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[i + 1])
end
local len = redis.call('APPEND', KEYS[1], ARGV[3])
refresh_group(3)
return len
"
    )
}

/// `delete`: KEYS = value, group, folders (deepest first); ARGV = members (deepest first).
/// Removes the value, its entry, and the entry of each folder it leaves empty. Returns
/// whether the value existed. `fenced`: as [`put_script`].
pub(super) fn delete_script(fenced: bool) -> String {
    let (check, last) = if fenced { (FENCE_CHECK, "last") } else { ("", "#KEYS") };
    format!(
        "#!lua\n{check}
local existed = redis.call('DEL', KEYS[1])
if KEYS[2] ~= '' then
  redis.call('SREM', KEYS[2], KEYS[1])
end
for i = 3, {last} do
  if i > 3 and redis.call('EXISTS', KEYS[i - 1]) == 1 then break end
  redis.call('SREM', KEYS[i], ARGV[i - 2])
end
return existed
"
    )
}

/// The server's time in ms, in a script (Redis 7 replicates scripts by their effects, so
/// `TIME` may be read before writing).
const NOW_MS: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
";

/// `acquire_lease`: KEYS[1] = the lease's hash; ARGV = node, TTL in ms. Returns `{granted
/// (1 or 0), holder, token, ms left}`, and when granted a fifth element: the node the lease
/// was taken over from (another node that let it expire without releasing it), else nil.
/// Granted when free (no hash, expired, released) or held live by the node already (token
/// kept); any other grant raises the token. Every grant clears `released`.
pub(super) fn acquire_script() -> String {
    format!(
        "#!lua\n{NOW_MS}
local held = redis.call('HMGET', KEYS[1], 'node', 'token', 'expires_at', 'released')
local node, token, expires = held[1], tonumber(held[2]) or 0, tonumber(held[3]) or 0
local live = node and expires > now
if live and node ~= ARGV[1] then
  return {{0, node, token, expires - now}}
end
local from = false
if not live then
  token = token + 1
  if node and node ~= ARGV[1] and held[4] ~= '1' then
    from = node
  end
end
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'token', string.format('%d', token),
  'expires_at', string.format('%d', now + ttl), 'released', '0')
return {{1, ARGV[1], token, ttl, from}}
"
    )
}

/// `renew_lease`: KEYS[1] = the lease's hash; ARGV = node, token, TTL in ms. Returns the ms
/// left if renewed (and clears `released`), -1 if the lease is not the node's at that token.
pub(super) fn renew_script() -> String {
    format!(
        "#!lua\n{NOW_MS}
local held = redis.call('HMGET', KEYS[1], 'node', 'token')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], 'expires_at', string.format('%d', now + tonumber(ARGV[3])),
  'released', '0')
return tonumber(ARGV[3])
"
    )
}

/// `renew_leases`: KEYS = the leases' hashes; ARGV[1] = TTL in ms, then each lease's node
/// and token (`ARGV[2i]`, `ARGV[2i + 1]` for `KEYS[i]`). Returns, in the order of KEYS, the
/// ms left for each lease renewed (as [`renew_script`]) and -1 for each one not the node's
/// at that token. One script, so one round trip and one clock reading for all of them.
pub(super) fn renew_many_script() -> String {
    format!(
        "#!lua\n{NOW_MS}
local ttl = tonumber(ARGV[1])
local until_ms = string.format('%d', now + ttl)
local out = {{}}
for i = 1, #KEYS do
  local held = redis.call('HMGET', KEYS[i], 'node', 'token')
  if held[1] == ARGV[2 * i] and held[2] == ARGV[2 * i + 1] then
    redis.call('HSET', KEYS[i], 'expires_at', until_ms, 'released', '0')
    out[i] = ttl
  else
    out[i] = -1
  end
end
return out
"
    )
}

/// `release_lease`: KEYS[1] = the lease's hash; ARGV = node, token. Expires it now and
/// marks it released if it is still the node's at that token (the token is kept). Returns 1
/// if it was, else 0.
pub(super) fn release_script() -> String {
    format!(
        "#!lua\n{NOW_MS}
local held = redis.call('HMGET', KEYS[1], 'node', 'token', 'expires_at')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
if (tonumber(held[3]) or 0) > now then
  redis.call('HSET', KEYS[1], 'expires_at', string.format('%d', now))
end
redis.call('HSET', KEYS[1], 'released', '1')
return 1
"
    )
}

/// `read_lease`: KEYS[1] = the lease's hash. Returns nil if it was never granted, else
/// `{holder, token, ms left (-1 once expired), released (1 or 0)}`, by the server's `TIME`.
/// Writes nothing (`no-writes`: it may run on a replica).
pub(super) fn read_script() -> String {
    format!(
        "#!lua flags=no-writes\n{NOW_MS}
local held = redis.call('HMGET', KEYS[1], 'node', 'token', 'expires_at', 'released')
if not held[1] then
  return false
end
local left = (tonumber(held[3]) or 0) - now
if left <= 0 then
  left = -1
end
local released = 0
if held[4] == '1' then
  released = 1
end
return {{held[1], tonumber(held[2]) or 0, left, released}}
"
    )
}

/// `list`: KEYS[1] = the listed folder's set; ARGV[1] = `<prefix>:`, ARGV[2] = the folder.
/// Returns `[key, size, key, size, ...]` for every value at any depth below, and removes
/// the entries whose value or folder is gone (expired, or left by an interrupted delete).
pub(super) const LIST_SCRIPT: &str = r"#!lua
local base = ARGV[1]
local out = {}
local todo = { ARGV[2] }
while #todo > 0 do
  local folder = table.remove(todo)
  local set = base .. 'd:' .. folder
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    if string.sub(member, -1) == '/' then
      local child = folder .. '/' .. string.sub(member, 1, -2)
      if redis.call('EXISTS', base .. 'd:' .. child) == 1 then
        table.insert(todo, child)
      else
        redis.call('SREM', set, member)
      end
    else
      local key = folder .. '/' .. member
      local value = base .. 'v:' .. key
      if redis.call('EXISTS', value) == 1 then
        table.insert(out, key)
        table.insert(out, redis.call('STRLEN', value))
      else
        redis.call('SREM', set, member)
      end
    end
  end
end
return out
";

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> StorageKey {
        StorageKey::new(k).unwrap()
    }

    #[test]
    fn folders_deepest_first_with_subfolder_members() {
        let l = Layout::new("p");
        let n = l.names(&key("checkpoints/s1/b/c.json"), false);
        assert_eq!(n.value, "p:v:checkpoints/s1/b/c.json");
        let folders: Vec<_> = n.folders.iter().map(|(f, m)| (f.as_str(), m.as_str())).collect();
        assert_eq!(
            folders,
            [
                ("p:d:checkpoints/s1/b", "c.json"),
                ("p:d:checkpoints/s1", "b/"),
                ("p:d:checkpoints", "s1/")
            ]
        );
        assert_eq!(n.group, "");
        assert!(l.names(&key("top"), true).folders.is_empty());
    }

    #[test]
    fn sessions_of_records() {
        assert_eq!(session_of(&key("sessions/a.b.json")), Some("a.b"));
        assert_eq!(session_of(&key("sessions/a.json.json.gz.enc")), Some("a.json"));
        assert_eq!(session_of(&key("checkpoints/a.b/c1.json")), Some("a.b"));
        assert_eq!(session_of(&key("metadata/access/a.json")), None);
        assert_eq!(session_of(&key("metadata/index.log")), None);
        let n = Layout::new("p").names(&key("checkpoints/s1/c1.json"), true);
        assert_eq!((n.group.as_str(), n.owned_folders), ("p:g:s1", 1));
        let n = Layout::new("p").names(&key("sessions/s1.json"), true);
        assert_eq!((n.group.as_str(), n.owned_folders), ("p:g:s1", 0));
    }
}
