#!/usr/bin/env ruby
# Renders one BOSH job template the way the director does, so the suite can check what a
# cell would really get:
#
#   ruby bosh_render.rb JOB_SPEC TEMPLATE INPUT_JSON
#
# INPUT_JSON is {"properties": {...manifest properties...}, "spec": {"name": ..., "id": ...}}.
# As in the director, only properties the job spec declares can be read, a property the
# manifest leaves unset reads as the spec's default, `p(name)` with neither is an error,
# `p(name, fallback)` gives the fallback, and `if_p(*names) { ... }` runs only when every
# property has a value (`.else { ... }` otherwise).  Errors go to stderr with exit status 1.
require 'erb'
require 'json'
require 'ostruct'
require 'yaml'

class UnknownProperty < StandardError; end

class ElseBlock
  def initialize(taken)
    @taken = taken
  end

  def else
    yield unless @taken
  end
end

class Template
  attr_reader :spec

  def initialize(job_spec, input)
    declared = job_spec.fetch('properties', {}) || {}
    @declared = declared.keys
    @defaults = declared.to_h { |name, d| [name, (d || {})['default']] }
    @manifest = input.fetch('properties', {})
    @spec = OpenStruct.new(input.fetch('spec', {}))
  end

  def value_of(name)
    raise UnknownProperty, "property '#{name}' is not declared in the job spec" unless @declared.include?(name)

    node = @manifest
    name.split('.').each do |part|
      return @defaults[name] unless node.is_a?(Hash) && node.key?(part)

      node = node[part]
    end
    node.nil? ? @defaults[name] : node
  end

  def p(name, *fallback)
    value = value_of(name)
    return value unless value.nil?
    return fallback.first unless fallback.empty?

    raise UnknownProperty, "Can't find property '#{name}'"
  end

  def if_p(*names)
    values = names.map { |name| value_of(name) }
    taken = values.none?(&:nil?)
    yield(*values) if taken
    ElseBlock.new(taken)
  end

  def render(text)
    ERB.new(text, trim_mode: '-').result(binding)
  end
end

begin
  job_spec = YAML.safe_load(File.read(ARGV.fetch(0)))
  template = File.read(ARGV.fetch(1))
  input = JSON.parse(File.read(ARGV.fetch(2)))
  print Template.new(job_spec, input).render(template)
rescue StandardError => e
  warn "#{e.class}: #{e.message}"
  exit 1
end
